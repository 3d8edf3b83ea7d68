// Reconciliation: start a run (POST /reconcile), open one (GET /reconcile/{id}), resolve an open
// discrepancy with an adjusting journal (POST /reconcile/{id}/resolve).
import { html, useState } from "../html.mjs";
import { get, post, seg } from "../api.mjs";
import { money, when, label } from "../format.mjs";
import { Fields, SearchForm, Status, Table, useLoad } from "../widgets.mjs";

const SUSPENSE = "liability:reconcile-suspense";
const CLEARING = "asset:stripe-clearing";

/** Suggested journal pairs [{debit, credit, amount, currency}] (finance/reconcile.py expected_adjustment). */
export function suggestedPairs(d) {
  const pair = (debit, credit, amount, currency) => ({ debit, credit, amount, currency });
  switch (d.reason) {
    case "ledger_missing":
      return [pair(CLEARING, SUSPENSE, d.provider_amount, d.provider_currency)];
    case "provider_missing":
      return [pair(SUSPENSE, CLEARING, d.ledger_amount, d.ledger_currency)];
    case "amount_mismatch":
      return [pair("expense:provider-difference", CLEARING, Math.abs(d.provider_amount - d.ledger_amount), d.ledger_currency)];
    case "currency_mismatch":
      return [pair(SUSPENSE, CLEARING, d.ledger_amount, d.ledger_currency),
        pair(CLEARING, SUSPENSE, d.provider_amount, d.provider_currency)];
    default: {
      const amounts = d.details?.amounts ?? [];
      const extra = amounts.length > 1 ? amounts.reduce((a, b) => a + b, 0) - (d.provider_amount || amounts[0]) : 1;
      return [pair("expense:reconcile-note", SUSPENSE, extra, d.ledger_currency || d.provider_currency)];
    }
  }
}

function ResolveForm({ runId, d, onDone }) {
  const [pairs, setPairs] = useState(suggestedPairs(d));
  const [reason, setReason] = useState("");
  const [status, setStatus] = useState({ text: "" });
  const edit = (i, key, value) => setPairs(pairs.map((p, j) => (i === j ? { ...p, [key]: value } : p)));
  const submit = async (event) => {
    event.preventDefault();
    const entries = pairs.flatMap((p) => [
      { account_id: p.debit, side: "debit", amount_cents: Number(p.amount), currency: p.currency },
      { account_id: p.credit, side: "credit", amount_cents: Number(p.amount), currency: p.currency },
    ]);
    setStatus({ text: "Posting the adjusting journal…" });
    try {
      const answer = await post(`/reconcile/${seg(runId)}/resolve`, { discrepancy_id: d.discrepancy_id, entries, reason });
      setStatus({ text: answer.status === "resolved" ? `Resolved by journal ${answer.journal_id}.`
        : `Waiting for approvals: action ${answer.action_id} (${answer.status}).` });
      onDone();
    } catch (e) {
      setStatus({ text: e.message, error: true });
    }
  };
  const id = (name, i = 0) => `${d.discrepancy_id}-${name}-${i}`;
  return html`
    <form class="resolve" onSubmit=${submit} aria-label=${`Resolve ${d.discrepancy_id}`}>
      ${pairs.map((p, i) => html`
        <fieldset key=${i}>
          <legend>Journal lines ${pairs.length > 1 ? i + 1 : ""}</legend>
          <label for=${id("debit", i)}>Debit account</label><input id=${id("debit", i)} value=${p.debit} onInput=${(e) => edit(i, "debit", e.target.value)} required />
          <label for=${id("credit", i)}>Credit account</label><input id=${id("credit", i)} value=${p.credit} onInput=${(e) => edit(i, "credit", e.target.value)} required />
          <label for=${id("amount", i)}>Amount (minor units)</label><input id=${id("amount", i)} type="number" min="1" value=${p.amount} onInput=${(e) => edit(i, "amount", e.target.value)} required />
          <label for=${id("currency", i)}>Currency</label><input id=${id("currency", i)} value=${p.currency} size="4" onInput=${(e) => edit(i, "currency", e.target.value.toUpperCase())} required />
        </fieldset>`)}
      <label for=${id("reason")}>Reason</label>
      <input id=${id("reason")} value=${reason} onInput=${(e) => setReason(e.target.value)} required maxlength="500" />
      <button type="submit">Resolve</button>
      <${Status} text=${status.text} error=${status.error} />
    </form>`;
}

function Run({ id }) {
  const { value: run, error, busy, reload } = useLoad(() => get(`/reconcile/${seg(id)}`), [id]);
  const [open, setOpen] = useState(null);
  if (busy && !run) return html`<p aria-busy="true">Loading ${id}…</p>`;
  if (error) return html`<${Status} error text=${error.status === 404 ? `No reconciliation ${id}.` : error.message} />`;
  const amount = (v, c) => (c ? money(v, c) : "—");
  return html`
    <section class="card" aria-labelledby="run-title" data-run=${run.reconcile_id}>
      <h2 id="run-title">Run ${run.reconcile_id} <span class=${`badge ${run.status}`}>${run.status}</span></h2>
      <${Fields} items=${[["Provider", run.provider], ["Window", `${when(run.from_ts)} – ${when(run.to_ts)}`],
        ["Matched", run.matched], ["Discrepancies", run.discrepancy_count], ["Open", run.open], ["Trigger", run.trigger]]} />
      <${Table} caption="Discrepancies" rows=${run.discrepancies} empty="No discrepancies: the ledger and the provider agree."
        columns=${[
          { key: "discrepancy_id", label: "Id" }, { key: "reason", label: "Reason", render: (d) => label(d.reason) },
          { key: "provider_reference", label: "Provider reference" },
          { key: "ledger_amount", label: "Ledger", numeric: true, render: (d) => amount(d.ledger_amount, d.ledger_currency) },
          { key: "provider_amount", label: "Provider", numeric: true, render: (d) => amount(d.provider_amount, d.provider_currency) },
          { key: "status", label: "Status", render: (d) => html`<span class=${`badge ${d.status}`} data-discrepancy-status=${d.discrepancy_id}>${d.status}</span>` },
          { key: "action", label: "Action", render: (d) => (d.status === "open"
            ? html`<button type="button" class="small" aria-expanded=${open === d.discrepancy_id ? "true" : "false"}
                onClick=${() => setOpen(open === d.discrepancy_id ? null : d.discrepancy_id)}>Resolve…</button>`
            : d.resolution_journal_id ?? "—") },
        ]} />
      ${run.discrepancies.filter((d) => d.discrepancy_id === open).map((d) => html`
        <${ResolveForm} key=${d.discrepancy_id} runId=${run.reconcile_id} d=${d} onDone=${reload} />`)}
    </section>`;
}

function StartRun({ go }) {
  const now = new Date();
  const [form, setForm] = useState({
    request_id: `console-${now.toISOString().replace(/[^0-9]/g, "").slice(0, 14)}`,
    from_ts: new Date(now.getTime() - 86_400_000).toISOString(), to_ts: now.toISOString(),
  });
  const [status, setStatus] = useState({ text: "" });
  const set = (key) => (e) => setForm({ ...form, [key]: e.target.value });
  const submit = async (event) => {
    event.preventDefault();
    setStatus({ text: "Reconciling…" });
    try {
      const report = await post("/reconcile", { ...form, provider: "stripe" });
      setStatus({ text: `Run ${report.reconcile_id}: ${report.discrepancy_count} discrepancies.` });
      go(`#/reconcile/${seg(report.reconcile_id)}`);
    } catch (e) {
      setStatus({ text: e.message, error: true });
    }
  };
  return html`
    <form class="card stack" onSubmit=${submit} aria-labelledby="start-title">
      <h2 id="start-title">Start a run (Stripe)</h2>
      <label for="rc-request">Request id</label><input id="rc-request" value=${form.request_id} onInput=${set("request_id")} required />
      <label for="rc-from">From (RFC 3339)</label><input id="rc-from" value=${form.from_ts} onInput=${set("from_ts")} required />
      <label for="rc-to">To (RFC 3339)</label><input id="rc-to" value=${form.to_ts} onInput=${set("to_ts")} required />
      <button type="submit">Run reconciliation</button>
      <${Status} text=${status.text} error=${status.error} />
    </form>`;
}

export function Reconcile({ params, go }) {
  return html`
    <h1>Reconciliation</h1>
    <div class="grid two">
      <${StartRun} go=${go} />
      <div class="card"><h2>Open a run</h2>
        <${SearchForm} id="run-id" label="Reconcile id" value=${params.id} onSubmit=${(id) => go(`#/reconcile/${seg(id)}`)}
          hint="e.g. reconcile-<request id>; scheduled runs are named reconcile-sched.<time>." /></div>
    </div>
    ${params.id && html`<${Run} key=${params.id} id=${params.id} />`}`;
}
