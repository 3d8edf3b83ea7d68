// In-browser verification of a proof package with WebCrypto: a port of the checks of
// signer/verify.py (docs/proofs.md, "Verifying a package") that WebCrypto can perform.
//
// Verified here: the canonical form of the file, the checkpoint and batch statements' fields,
// every signature (ECDSA P-256 over SHA-256 of the canonical statement, raw r||s; Ed25519 over the
// 32-byte SHA-256 digest of the canonical statement), each batch statement's RFC 9162 inclusion in
// the checkpoint's log, and for member batches: journal bodies hash to their entries, entries cover
// first_seq..last_seq in order, prev_hash links, and the batch's Merkle root.
// Not verified here: range completeness at the shard ends (boundary batches, the checkpoint's
// per-shard last batch) -- `ledger-node verify` does that; and for a ledger hashing with BLAKE3,
// every body hash and Merkle computation (WebCrypto has no BLAKE3): only the signatures are checked.
// `report.notVerified` lists what was left out, and the console shows it next to the verdict.

const FORMAT = "ledger-node/proof-package/v1";
const BATCH_TYPE = "ledger-node/batch/v1";
const CHECKPOINT_TYPE = "ledger-node/checkpoint/v1";
const ORIGIN = "ledger-node";
const BATCH_FIELDS = ["batch_seq", "first_seq", "hash_alg", "last_seq", "root", "shard", "signed_at",
  "signer", "signer_kid", "size", "type"];
const CHECKPOINT_FIELDS = ["hash_alg", "origin", "root", "shards", "signer", "signer_kid", "timestamp",
  "tree_size", "type"];
const ED25519_OID = [0x06, 0x03, 0x2b, 0x65, 0x70];
const P256_OID = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const HEX64 = /^[0-9a-f]{64}$/;
export const RANGE_NOTE = "range completeness at the shard ends (checked by `ledger-node verify`)";
export const BLAKE3_NOTE = "journal body hashes, batch Merkle roots and log inclusion: the ledger hashes "
  + "with BLAKE3, which WebCrypto lacks (use `ledger-node verify`)";

const utf8 = new TextEncoder();

// -- canonical JSON (signer/canonical.py: sorted keys, compact, UTF-8, integers) -------------------
export function canonical(value) {
  if (value === null || typeof value === "boolean") return String(value);
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new Error(`number ${value} is not an exact integer`);
    return String(value);
  }
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
}

// -- bytes ----------------------------------------------------------------------------------------
export const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

function fromHex(text) {
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

const equal = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** Canonical (padded, standard alphabet) base64 -> bytes; null for anything else. */
function base64Bytes(text) {
  if (typeof text !== "string" || !text) return null;
  let binary;
  try {
    binary = atob(text);
  } catch {
    return null;
  }
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return btoa(binary) === text ? bytes : null;
}

// -- RFC 9162 Merkle trees (signer/merkle.py) ------------------------------------------------------
const leafHash = (data) => sha256(concat(new Uint8Array([0]), data));
const nodeHash = (left, right) => sha256(concat(new Uint8Array([1]), left, right));

async function rootOf(leaves) {
  if (leaves.length === 0) return sha256(new Uint8Array());
  if (leaves.length === 1) return leaves[0];
  let k = 1;
  while (k * 2 < leaves.length) k *= 2;
  return nodeHash(await rootOf(leaves.slice(0, k)), await rootOf(leaves.slice(k)));
}

/** RFC 9162 2.1.3.2: the root an audit path implies for leaf `index` of `size`, or null. */
async function inclusionRoot(leaf, index, size, proof) {
  if (!(Number.isSafeInteger(index) && Number.isSafeInteger(size) && index >= 0 && index < size)) return null;
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0) return null;
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      while (fn % 2 === 0 && fn !== 0) {
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  return sn === 0 ? r : null;
}

// -- keys (signer/keys.py) ------------------------------------------------------------------------
function pemToDer(pem) {
  const body = String(pem).replace(/-----(BEGIN|END) PUBLIC KEY-----/g, "").replace(/\s+/g, "");
  const der = base64Bytes(body);
  if (!der) throw new Error("not a PEM public key");
  return der;
}

function contains(bytes, pattern) {
  outer: for (let i = 0; i + pattern.length <= bytes.length; i += 1) {
    for (let j = 0; j < pattern.length; j += 1) if (bytes[i + j] !== pattern[j]) continue outer;
    return true;
  }
  return false;
}

/** {kid, algorithm, key} from PEM SubjectPublicKeyInfo; throws for anything but P-256 / Ed25519. */
export async function trustedKey(pem) {
  const der = pemToDer(pem);
  let algorithm;
  let params;
  if (contains(der, ED25519_OID)) {
    algorithm = "ed25519";
    params = { name: "Ed25519" };
  } else if (contains(der, P256_OID)) {
    algorithm = "ecdsa-p256-sha256";
    params = { name: "ECDSA", namedCurve: "P-256" };
  } else {
    throw new Error("public key is neither EC P-256 nor Ed25519");
  }
  const key = await crypto.subtle.importKey("spki", der, params, false, ["verify"]);
  const family = algorithm === "ed25519" ? "ed25519" : "p256";
  return { kid: `${family}-${hex(await sha256(der)).slice(0, 16)}`, algorithm, key };
}

async function verifyStatement(trusted, statement, signatureText) {
  const key = trusted.get(statement.signer_kid);
  if (!key) return `signed by ${JSON.stringify(statement.signer_kid)}, which is not among the trusted keys`;
  const signature = base64Bytes(signatureText);
  if (!signature) return "signature is not canonical base64";
  const bytes = utf8.encode(canonical(statement));
  let valid;
  if (key.algorithm === "ed25519") {
    valid = await crypto.subtle.verify({ name: "Ed25519" }, key.key, signature, await sha256(bytes));
  } else {
    valid = await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key.key, signature, bytes);
  }
  return valid ? null : `signature does not verify under ${key.kid} (${key.algorithm})`;
}

// -- statements -----------------------------------------------------------------------------------
const isInt = (v, low = 0) => Number.isSafeInteger(v) && v >= low;
const sameFields = (object, fields) =>
  object && typeof object === "object" && canonical(Object.keys(object).sort()) === canonical(fields);

function commonProblem(stmt) {
  if (!HEX64.test(stmt.root ?? "")) return "root is not 64 lowercase hex";
  if (typeof stmt.signer_kid !== "string" || !stmt.signer_kid) return "signer_kid is not a non-empty string";
  if (!["pkcs11", "software"].includes(stmt.signer)) return `signer ${stmt.signer} is not pkcs11 or software`;
  return null;
}

function checkpointProblem(stmt, alg) {
  if (!sameFields(stmt, CHECKPOINT_FIELDS)) return "fields differ from the checkpoint statement's";
  if (stmt.type !== CHECKPOINT_TYPE || stmt.origin !== ORIGIN || stmt.hash_alg !== alg) {
    return `type/origin/hash_alg are not ${CHECKPOINT_TYPE} / ${ORIGIN} / ${alg}`;
  }
  if (!isInt(stmt.tree_size, 1)) return "tree_size is not a positive integer";
  if (Number.isNaN(Date.parse(stmt.timestamp))) return "timestamp is not RFC 3339";
  return commonProblem(stmt);
}

function batchProblem(stmt, alg) {
  if (!sameFields(stmt, BATCH_FIELDS)) return "fields differ from the batch statement's";
  if (stmt.type !== BATCH_TYPE || stmt.hash_alg !== alg) return `type / hash_alg is not ${BATCH_TYPE} / ${alg}`;
  if (!Number.isSafeInteger(stmt.shard) || !isInt(stmt.batch_seq, 1)) return "shard / batch_seq is not an integer";
  if (!(isInt(stmt.first_seq, 1) && isInt(stmt.last_seq, 1) && stmt.first_seq <= stmt.last_seq)) {
    return "first_seq / last_seq are not integers with 1 <= first_seq <= last_seq";
  }
  if (stmt.size !== stmt.last_seq - stmt.first_seq + 1) return "size != last_seq - first_seq + 1";
  if (Number.isNaN(Date.parse(stmt.signed_at))) return "signed_at is not RFC 3339";
  return commonProblem(stmt);
}

// -- the verifier ---------------------------------------------------------------------------------
class Recorder {
  constructor() {
    this.checks = [];
    this.warnings = [];
    this.notVerified = [];
    this.firstBadJournal = null;
  }

  pass(name, detail) {
    this.checks.push({ name, ok: true, detail });
  }

  fail(name, detail, journal = null) {
    this.checks.push({ name, ok: false, detail });
    if (journal && this.firstBadJournal === null) this.firstBadJournal = journal;
  }

  report(counts) {
    const ok = this.checks.length > 0 && this.checks.every((c) => c.ok);
    return { ok, checks: this.checks, warnings: this.warnings, notVerified: this.notVerified,
      firstBadJournal: this.firstBadJournal, counts };
  }
}

async function loadTrusted(pems, rec) {
  const trusted = new Map();
  const problems = [];
  for (const [i, pem] of pems.entries()) {
    try {
      const key = await trustedKey(pem);
      trusted.set(key.kid, key);
    } catch (error) {
      problems.push(`public key #${i + 1}: ${error.message}`);
    }
  }
  if (!trusted.size && !problems.length) problems.push("no trusted public key given");
  for (const p of problems) rec.fail("trusted keys", p);
  if (!problems.length) rec.pass("trusted keys", `${trusted.size} key(s): ${[...trusted.keys()].sort().join(", ")}`);
  return trusted;
}

function decode(text, rec) {
  let pkg;
  try {
    pkg = JSON.parse(text);
  } catch (error) {
    rec.fail("decode", `not JSON: ${error.message}`);
    return null;
  }
  const problem = pkg?.format !== FORMAT ? `format is not ${FORMAT}`
    : !["sha256", "blake3"].includes(pkg.hash_alg) ? `hash_alg ${pkg.hash_alg} is not supported`
      : !Array.isArray(pkg.batches) || !Array.isArray(pkg.journals) || !pkg.checkpoint ? "batches / journals / checkpoint missing"
        : null;
  if (problem) {
    rec.fail("decode", problem);
    return null;
  }
  let again;
  try {
    again = canonical(pkg);
  } catch (error) {
    rec.fail("decode", `cannot be re-encoded canonically: ${error.message}`);
    return null;
  }
  if (again !== text) {
    rec.fail("decode", "package is not in canonical form (sorted keys, compact, minimal escapes)");
    return null;
  }
  rec.pass("decode", `${FORMAT} ${JSON.stringify(pkg.proof_id)}: ${pkg.batches.length} batches, ${pkg.journals.length} journals`);
  return pkg;
}

async function checkSigner(pkg, checkpoint, rec) {
  const problems = [];
  if (checkpoint && checkpoint.signer !== pkg.signer?.kind) {
    problems.push(`package says signer ${pkg.signer?.kind} but the signed checkpoint says ${checkpoint.signer}`);
  }
  for (const listed of pkg.signer?.keys ?? []) {
    try {
      const derived = await trustedKey(listed.pem);
      if (derived.kid !== listed.kid || derived.algorithm !== listed.algorithm) {
        problems.push(`listed key ${listed.kid} (${listed.algorithm}) is really ${derived.kid} (${derived.algorithm})`);
      }
    } catch (error) {
      problems.push(`listed key ${listed.kid}: ${error.message}`);
    }
  }
  for (const p of problems) rec.fail("signer", p);
  if (!problems.length) rec.pass("signer", `kind ${pkg.signer?.kind}, listed keys consistent with their PEMs`);
  const statements = [pkg.checkpoint.statement, ...pkg.batches.map((b) => b.statement)];
  if (pkg.signer?.kind === "software" || statements.some((s) => s?.signer === "software")) {
    rec.warnings.push("SIGNER IS 'software': statements were signed with a development key, not in an HSM");
  }
}

async function checkBatch(batch, checkpoint, trusted, alg, rec) {
  const stmt = batch.statement;
  const problem = batchProblem(stmt, alg);
  const name = `batch ${stmt?.shard}/${stmt?.batch_seq} (log ${batch.log_index}, ${batch.role})`;
  if (problem) {
    rec.fail(`batch (log ${batch.log_index}) statement`, problem);
    return null;
  }
  const bad = await verifyStatement(trusted, stmt, batch.signature);
  if (bad) rec.fail(`${name} signature`, bad);
  else rec.pass(`${name} signature`, `valid signature by ${stmt.signer_kid}`);
  if (alg !== "sha256") return { batch, stmt, name };
  if (!checkpoint) {
    rec.fail(`${name} log inclusion`, "no usable checkpoint to check against");
  } else {
    const leaf = await leafHash(await sha256(utf8.encode(canonical(stmt))));
    const proof = (batch.log_proof ?? []).filter((p) => HEX64.test(p)).map(fromHex);
    const root = proof.length === (batch.log_proof ?? []).length
      ? await inclusionRoot(leaf, batch.log_index, checkpoint.tree_size, proof) : null;
    if (root && hex(root) === checkpoint.root) {
      rec.pass(`${name} log inclusion`, `leaf ${batch.log_index} of ${checkpoint.tree_size} (${proof.length} proof hashes)`);
    } else {
      rec.fail(`${name} log inclusion`, `proof does not place this statement at index ${batch.log_index} of ${checkpoint.tree_size}`);
    }
  }
  return { batch, stmt, name };
}

async function checkMember({ batch, stmt, name }, bodies, previousLast, rec) {
  const entries = batch.entries ?? [];
  let bad = 0;
  for (const entry of entries) {
    const body = bodies.get(entry.journal_id);
    const where = `entry ${stmt.shard}/${entry.seq}`;
    let problem = null;
    if (!body) problem = `${where}: the body of journal ${entry.journal_id} is missing from the package`;
    else if (hex(await sha256(body.bytes)) !== entry.hash) problem = `${where}: SHA-256 of the body differs from the entry hash`;
    else if (stmt.shard >= 0 && body.journalId !== entry.journal_id) problem = `${where}: body is journal ${body.journalId}`;
    if (problem) {
      bad += 1;
      rec.fail(`journal ${entry.journal_id}`, problem, entry.journal_id);
    }
  }
  if (!bad) rec.pass(`${name} journals`, `${entries.length} bodies hash to their entries`);
  const inOrder = entries.every((e, i) => e.seq === stmt.first_seq + i) && entries.length === stmt.size;
  if (inOrder) rec.pass(`${name} entries`, `seq ${stmt.first_seq}..${stmt.last_seq} complete, in order`);
  else rec.fail(`${name} entries`, `entries are not exactly seq ${stmt.first_seq}..${stmt.last_seq} in order`);
  if (inOrder) {
    const broken = entries.filter((e, i) => {
      const expected = i > 0 ? entries[i - 1].hash : e.seq === 1 ? null : previousLast;
      return expected !== undefined && e.prev_hash !== expected;
    });
    for (const e of broken) rec.fail(`${name} chain`, `seq ${e.seq}: prev_hash does not link`, e.journal_id);
    if (!broken.length) rec.pass(`${name} chain`, "prev_hash links hold");
  }
  const leaves = await Promise.all(entries.map((e) => leafHash(fromHex(e.hash))));
  const computed = hex(await rootOf(leaves));
  if (computed === stmt.root) rec.pass(`${name} merkle root`, `${leaves.length} leaves -> ${computed}`);
  else rec.fail(`${name} merkle root`, `computed ${computed}, statement says ${stmt.root}`);
}

/** Verify a package (its exact text) against trusted PEM keys; never throws. */
export async function verifyPackage(text, pems) {
  const rec = new Recorder();
  const counts = { journals: 0, batches: 0, shards: 0 };
  try {
    const trusted = await loadTrusted(pems, rec);
    const pkg = decode(text, rec);
    if (!pkg) return rec.report(counts);
    const alg = pkg.hash_alg;
    const cpStmt = pkg.checkpoint.statement;
    const cpProblem = checkpointProblem(cpStmt, alg);
    const checkpoint = cpProblem ? null : cpStmt;
    if (cpProblem) rec.fail("checkpoint statement", cpProblem);
    else {
      rec.pass("checkpoint statement", `tree_size ${cpStmt.tree_size}, root ${cpStmt.root}`);
      const bad = await verifyStatement(trusted, cpStmt, pkg.checkpoint.signature);
      if (bad) rec.fail("checkpoint signature", bad);
      else rec.pass("checkpoint signature", `valid signature by ${cpStmt.signer_kid}`);
    }
    await checkSigner(pkg, checkpoint, rec);
    const parsed = [];
    for (const batch of pkg.batches) {
      const one = await checkBatch(batch, checkpoint, trusted, alg, rec);
      if (one) parsed.push(one);
    }
    Object.assign(counts, { journals: pkg.journals.length, batches: pkg.batches.length,
      shards: new Set(parsed.map((p) => p.stmt.shard)).size });
    rec.notVerified.push(RANGE_NOTE);
    if (alg !== "sha256") {
      rec.notVerified.push(BLAKE3_NOTE);
      return rec.report(counts);
    }
    const bodies = new Map();
    for (const j of pkg.journals) {
      let journalId = null;
      try {
        journalId = JSON.parse(j.body).journal_id ?? null;
      } catch {
        /* reported as a mismatch below */
      }
      bodies.set(j.journal_id, { bytes: utf8.encode(j.body), journalId });
    }
    const members = parsed.filter((p) => p.batch.role === "member")
      .sort((a, b) => a.stmt.shard - b.stmt.shard || a.stmt.batch_seq - b.stmt.batch_seq);
    const lastHash = new Map(members.map((m) => [`${m.stmt.shard}/${m.stmt.batch_seq}`, m.batch.entries.at(-1)?.hash]));
    const referenced = new Set();
    for (const member of members) {
      for (const e of member.batch.entries ?? []) referenced.add(e.journal_id);
      await checkMember(member, bodies, lastHash.get(`${member.stmt.shard}/${member.stmt.batch_seq - 1}`), rec);
    }
    for (const jid of [...bodies.keys()].filter((j) => !referenced.has(j)).sort()) {
      rec.fail(`journal ${jid}`, "body is in the package but no member entry names it", jid);
    }
  } catch (error) {
    rec.fail("internal error", `verification aborted: ${error.name}: ${error.message}`);
  }
  return rec.report(counts);
}
