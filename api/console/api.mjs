// Calls to the node's API: the operator token (sessionStorage) goes with every call as a bearer token.
const TOKEN_KEY = "ledger-node.console.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** An API error: HTTP status plus the envelope's {code, message, details}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(`${error.code || status}: ${error.message || "request failed"}`);
    this.status = status;
    this.code = error.code;
    this.details = error.details || {};
  }
}

function headers(extra) {
  const sent = { Accept: "application/json", ...extra };
  const current = token();
  if (current) sent.Authorization = `Bearer ${current}`;
  return sent;
}

/** JSON call; resolves to the envelope body (`ok: true`) or throws ApiError. */
export async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  let parsed;
  try {
    parsed = await response.json();
  } catch {
    throw new ApiError(response.status, { code: "BAD_RESPONSE", message: `HTTP ${response.status}, not JSON` });
  }
  if (!response.ok || parsed.ok === false) {
    throw new ApiError(response.status, parsed.error || {});
  }
  return parsed;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});

/** Raw bytes of a download (a proof package, an invoice PDF) with the token. */
export async function download(path) {
  const response = await fetch(path, { headers: headers({}) });
  if (!response.ok) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      /* not JSON */
    }
    throw new ApiError(response.status, error);
  }
  return new Uint8Array(await response.arrayBuffer());
}

/** `encodeURIComponent` for one path segment. */
export const seg = (value) => encodeURIComponent(String(value));
