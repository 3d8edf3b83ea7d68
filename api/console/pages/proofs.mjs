// Proofs: generate a package (POST /proofs/generate), wait for it (GET /proofs/{id}), download it
// (GET /proofs/{id}/package) and verify a package in the browser (../verify.mjs) against trusted keys.
import { html, useState, useEffect } from "../html.mjs";
import { get, post, download, seg } from "../api.mjs";
import { when } from "../format.mjs";
import { verifyPackage } from "../verify.mjs";
import { Fields, Status } from "../widgets.mjs";

const POLL_MS = 500;

function Generate({ onReady }) {
  const now = new Date();
  const [range, setRange] = useState({ from_ts: new Date(now.getTime() - 3_600_000).toISOString(), to_ts: now.toISOString() });
  const [proof, setProof] = useState(null);
  const [status, setStatus] = useState({ text: "" });
  useEffect(() => {
    if (!proof || proof.status !== "generating") return undefined;
    const timer = setTimeout(async () => {
      try {
        const next = (await get(`/proofs/${seg(proof.proof_id)}`)).proof;
        setProof(next);
        if (next.status === "ready") {
          setStatus({ text: `Proof ${next.proof_id} is ready.` });
          onReady(new TextDecoder().decode(await download(`/proofs/${seg(next.proof_id)}/package`)), next.proof_id);
        } else if (next.status === "failed") setStatus({ text: `Generation failed: ${next.error?.message}`, error: true });
      } catch (e) {
        setStatus({ text: e.message, error: true });
      }
    }, POLL_MS);
    return () => clearTimeout(timer);
  }, [proof]);
  const submit = async (event) => {
    event.preventDefault();
    setStatus({ text: "Generating…" });
    try {
      const started = await post("/proofs/generate", { range });
      setProof({ proof_id: started.proof_id, status: started.status });
    } catch (e) {
      setStatus({ text: e.message, error: true });
    }
  };
  const set = (key) => (e) => setRange({ ...range, [key]: e.target.value });
  return html`
    <form class="card stack" onSubmit=${submit} aria-labelledby="gen-title">
      <h2 id="gen-title">Generate a proof</h2>
      <label for="proof-from">From (RFC 3339)</label><input id="proof-from" value=${range.from_ts} onInput=${set("from_ts")} required />
      <label for="proof-to">To (RFC 3339)</label><input id="proof-to" value=${range.to_ts} onInput=${set("to_ts")} required />
      <button type="submit">Generate</button>
      <${Status} text=${status.text} error=${status.error} />
      ${proof && html`<${Fields} items=${[["Proof", proof.proof_id], ["Status", proof.status], ["Checkpoint", proof.checkpoint ? `tree ${proof.checkpoint.tree_size}, root ${proof.checkpoint.root}` : null], ["Signed at", when(proof.ts)]]} />`}
    </form>`;
}

function Report({ report }) {
  const failed = report.checks.filter((c) => !c.ok).length;
  return html`
    <div class=${report.ok ? "verdict ok" : "verdict bad"} data-verdict=${report.ok ? "verified" : "failed"}>
      <p class="verdict-line"><strong>${report.ok ? "VERIFIED in this browser" : `NOT VERIFIED: ${failed} failed check(s)`}</strong>
        ${report.firstBadJournal && html` · first bad journal: <code>${report.firstBadJournal}</code>`}</p>
      <p>${report.counts.journals} journals, ${report.counts.batches} batches, ${report.counts.shards} shard(s).</p>
      ${report.warnings.map((w) => html`<p class="warning" key=${w}>⚠ ${w}</p>`)}
      ${report.notVerified.length > 0 && html`<div class="note"><strong>Not verified in the browser:</strong>
        <ul>${report.notVerified.map((n) => html`<li key=${n}>${n}</li>`)}</ul></div>`}
      <ol class="checks">${report.checks.map((c, i) => html`<li key=${i} class=${c.ok ? "pass" : "fail"}>
        <span aria-hidden="true">${c.ok ? "✓" : "✗"}</span><span class="visually-hidden">${c.ok ? "passed" : "failed"}</span>
        <strong>${c.name}</strong>: ${c.detail}</li>`)}</ol>
    </div>`;
}

function Verify({ text, setText, name }) {
  const [keys, setKeys] = useState("");
  const [report, setReport] = useState(null);
  const [status, setStatus] = useState({ text: "" });
  const loadKeys = async () => {
    try {
      const listed = (await get("/keys")).keys;
      setKeys(listed.map((k) => k.pem.trim()).join("\n"));
      setStatus({ text: `Loaded ${listed.length} key(s) from this node's /keys.` });
    } catch (e) {
      setStatus({ text: e.message, error: true });
    }
  };
  const pickFile = async (event) => {
    const file = event.target.files[0];
    if (file) setText(await file.text(), file.name);
  };
  const run = async (event) => {
    event.preventDefault();
    const pems = keys.match(/-----BEGIN PUBLIC KEY-----[\s\S]+?-----END PUBLIC KEY-----/g) ?? [];
    setStatus({ text: "Verifying…" });
    const result = await verifyPackage(text, pems);
    setReport(result);
    setStatus({ text: result.ok ? "The package verified." : "The package did NOT verify.", error: !result.ok });
  };
  return html`
    <form class="card stack" onSubmit=${run} aria-labelledby="verify-title">
      <h2 id="verify-title">Verify a proof package</h2>
      <label for="package-file">Package file</label>
      <input id="package-file" type="file" accept=".json,application/json" onChange=${pickFile} />
      <label for="package-text">Package (exact bytes, canonical JSON)${name ? ` — ${name}` : ""}</label>
      <textarea id="package-text" rows="4" spellcheck=${false} value=${text} onInput=${(e) => setText(e.target.value, "edited")}></textarea>
      <label for="trusted-keys">Trusted public keys (PEM)</label>
      <textarea id="trusted-keys" rows="4" spellcheck=${false} value=${keys} onInput=${(e) => setKeys(e.target.value)}
        aria-describedby="keys-hint"></textarea>
      <small id="keys-hint" class="muted">An auditor pastes the keys they trust. Keys loaded from this node only show the
        package is consistent with what the node publishes.</small>
      <div class="row"><button type="button" onClick=${loadKeys}>Load keys from /keys</button>
        <button type="submit" disabled=${!text}>Verify in browser</button></div>
      <${Status} text=${status.text} error=${status.error} />
      ${report && html`<${Report} report=${report} />`}
    </form>`;
}

export function Proofs() {
  const [pkg, setPkg] = useState({ text: "", name: "" });
  return html`
    <h1>Proofs</h1>
    <div class="grid two">
      <${Generate} onReady=${(text, id) => setPkg({ text, name: `${id}.json` })} />
      <${Verify} text=${pkg.text} name=${pkg.name} setText=${(text, name) => setPkg({ text, name })} />
    </div>`;
}
