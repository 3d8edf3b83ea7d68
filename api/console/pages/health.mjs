// Health: liveness and signer (GET /health), readiness of the database, shards and coordinator (GET /ready).
import { html } from "../html.mjs";
import { call } from "../api.mjs";
import { Fields, Status, Table, useLoad } from "../widgets.mjs";

async function readiness() {
  try {
    return { ready: true, ...(await call("GET", "/ready")) };
  } catch (e) {
    return { ready: false, ...(e.details ?? {}), message: e.message };
  }
}

const yes = (v) => html`<span class=${v ? "badge ok" : "badge bad"}>${v ? "ok" : "down"}</span>`;

export function Health() {
  const health = useLoad(() => call("GET", "/health"), []);
  const ready = useLoad(readiness, []);
  const h = health.value;
  const r = ready.value;
  const refresh = () => {
    health.reload();
    ready.reload();
  };
  return html`
    <h1>Shard and signer health</h1>
    <button type="button" onClick=${refresh}>Refresh</button>
    <div class="grid two">
      <section class="card" aria-labelledby="signer-title"><h2 id="signer-title">Signer</h2>
        ${health.error && html`<${Status} error text=${health.error.message} />`}
        ${h && html`<${Fields} items=${[["Signing configured", yes(h.signingConfigured)], ["Signer", h.signer], ["mTLS", h.mTLS ? "on" : "off"]]} />
          ${h.warning && html`<p class="warning">⚠ ${h.warning}</p>`}`}
      </section>
      <section class="card" aria-labelledby="ready-title"><h2 id="ready-title">Readiness <span data-ready=${r ? String(r.ready) : ""}>${r && yes(r.ready)}</span></h2>
        ${r && html`<${Fields} items=${[["Database", yes(r.database)], ["Coordinator", yes(r.coordinator)]]} />
          ${r.message && !r.ready && html`<${Status} error text=${r.message} />`}`}
      </section>
    </div>
    ${r?.shards && html`<section class="card"><${Table} caption="Shards" rows=${r.shards} columns=${[
      { key: "shard_id", label: "Shard" }, { key: "ok", label: "Status", render: (s) => yes(s.ok) },
      { key: "journals", label: "Journals", numeric: true }, { key: "batches", label: "Batches", numeric: true },
      { key: "queue_depth", label: "Queue depth", numeric: true }]} /></section>`}`;
}
