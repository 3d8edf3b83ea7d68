// Payout batches (GET /finance/payout/batches/{id}) and the multisig queue: pending actions
// (GET /finance/approvals?status=pending_approval), one action (GET /finance/approvals/{id}) and
// approval by uploading the file `ledger-node approve ACTION --out FILE` wrote (POST /finance/approvals/{id}).
import { html, useState } from "../html.mjs";
import { get, post, seg } from "../api.mjs";
import { money, when } from "../format.mjs";
import { Fields, SearchForm, Status, Table, useLoad } from "../widgets.mjs";

const APPROVAL_FORMAT = "ledger-node/approval/v1";

/** {approver_id, signature} from an approval file: the JSON of `--out`, or `--dry-run` output (its last line). */
export function parseApprovalFile(text, actionId, approverId) {
  const trimmed = text.trim();
  if (trimmed.startsWith("{")) {
    const file = JSON.parse(trimmed);
    if (file.format !== APPROVAL_FORMAT) throw new Error(`not a ${APPROVAL_FORMAT} file`);
    if (file.action_id !== actionId) throw new Error(`the file approves ${file.action_id}, not ${actionId}`);
    return { approver_id: file.approver_id, signature: file.signature };
  }
  const signature = trimmed.split(/\s+/).at(-1);
  if (!approverId) throw new Error("a bare signature needs the approver id");
  return { approver_id: approverId, signature };
}

function Batch({ id }) {
  const { value, error, busy } = useLoad(() => get(`/finance/payout/batches/${seg(id)}`), [id]);
  if (busy) return html`<p aria-busy="true">Loading batch ${id}…</p>`;
  if (error) return html`<${Status} error text=${error.status === 404 ? `No payout batch ${id}.` : error.message} />`;
  const batch = value.batch;
  return html`
    <section class="card" aria-labelledby="batch-title" data-batch=${batch.batch_id}>
      <h2 id="batch-title">Batch ${batch.batch_id} <span class=${`badge ${batch.status}`} data-batch-status>${batch.status}</span></h2>
      <${Fields} items=${[["Payout date", batch.payout_date], ["Action", batch.action_id], ["Created", when(batch.created_at)],
        ["Completed", when(batch.completed_at)],
        ...Object.entries(batch.totals).map(([c, t]) => [`Total ${c}`, `${money(t.total, c)} (paid ${money(t.paid, c)})`])]} />
      <${Table} caption="Payouts" rows=${batch.payouts} columns=${[
        { key: "payout_id", label: "Payout" }, { key: "participant_id", label: "Participant" },
        { key: "amount", label: "Amount", numeric: true, render: (p) => money(p.amount, p.currency) },
        { key: "state", label: "State" }]} />
      <${Table} caption="Skipped" rows=${batch.skipped} empty="No participant skipped." columns=${[
        { key: "participant_id", label: "Participant" }, { key: "reason", label: "Reason" },
        { key: "amount", label: "Amount", numeric: true, render: (s) => (s.currency ? money(s.amount, s.currency) : s.amount) }]} />
    </section>`;
}

function Approve({ action, onDone }) {
  const [approver, setApprover] = useState("");
  const [status, setStatus] = useState({ text: "" });
  const fileId = `approval-file-${action.action_id}`;
  const submit = async (event) => {
    event.preventDefault();
    const file = event.target.elements[fileId].files[0];
    if (!file) {
      setStatus({ text: "Choose the approval file first.", error: true });
      return;
    }
    try {
      const body = parseApprovalFile(await file.text(), action.action_id, approver.trim());
      const answer = (await post(`/finance/approvals/${seg(action.action_id)}`, body)).action;
      setStatus({ text: `Approval by ${body.approver_id} recorded: ${answer.approvals_valid} of ${answer.approvals_required}, ${answer.status}.` });
      event.target.reset();
      onDone();
    } catch (e) {
      setStatus({ text: e.message, error: true });
    }
  };
  return html`
    <form class="stack" onSubmit=${submit} aria-label=${`Approve ${action.action_id}`}>
      <label for=${fileId}>Approval file from <code>ledger-node approve ${action.action_id} --out FILE</code></label>
      <input id=${fileId} name=${fileId} type="file" accept=".json,.txt,application/json,text/plain" />
      <label for=${`${fileId}-who`}>Approver id (only for a bare signature)</label>
      <input id=${`${fileId}-who`} value=${approver} onInput=${(e) => setApprover(e.target.value)} />
      <button type="submit">Upload approval</button>
      <${Status} text=${status.text} error=${status.error} />
    </form>`;
}

function Action({ id, go }) {
  const { value, error, busy, reload } = useLoad(() => get(`/finance/approvals/${seg(id)}`), [id]);
  if (busy && !value) return html`<p aria-busy="true">Loading action ${id}…</p>`;
  if (error) return html`<${Status} error text=${error.message} />`;
  const a = value.action;
  const batchId = a.params?.batch_id;
  return html`
    <section class="card" aria-labelledby="action-title" data-action=${a.action_id}>
      <h2 id="action-title">Action ${a.action_id} <span class=${`badge ${a.status}`} data-action-status>${a.status}</span></h2>
      <${Fields} items=${[["Kind", a.kind], ["Amount", money(a.amount, a.currency)],
        ["Approvals", html`<span data-approvals>${a.approvals_valid} of ${a.approvals_required}</span> (${a.policy})`],
        ["Params hash", html`<code>${a.statement.params_hash}</code>`], ["Expires", when(a.expires_at)], ["Requested by", a.requested_by]]} />
      ${batchId && html`<p><a href=${`#/payouts/batch/${seg(batchId)}`}>Open payout batch ${batchId}</a></p>`}
      <${Table} caption="Approvals" rows=${a.approvals} empty="No approvals yet." columns=${[
        { key: "approver_id", label: "Approver" }, { key: "approved_at", label: "At", render: (r) => when(r.approved_at) },
        { key: "counts", label: "Counts", render: (r) => (r.counts ? "yes" : "no") }]} />
      ${a.status === "pending_approval" && html`<${Approve} action=${a} onDone=${reload} />`}
    </section>`;
}

function Pending({ go }) {
  const { value, error, reload } = useLoad(() => get("/finance/approvals?status=pending_approval"), []);
  return html`
    <section class="card" aria-labelledby="pending-title">
      <header class="card-head"><h2 id="pending-title">Pending approvals</h2>
        <button type="button" class="small" onClick=${reload}>Refresh</button></header>
      ${error && html`<${Status} error text=${error.message} />`}
      ${value && html`<${Table} caption=${`Actions waiting for ${value.policy} approvals`} rows=${value.actions} empty="Nothing waits for approval."
        columns=${[
          { key: "action_id", label: "Action", render: (a) => html`<a href=${`#/payouts/action/${seg(a.action_id)}`}>${a.action_id}</a>` },
          { key: "kind", label: "Kind" }, { key: "amount", label: "Amount", numeric: true, render: (a) => money(a.amount, a.currency) },
          { key: "expires_at", label: "Expires", render: (a) => when(a.expires_at) }]} />`}
    </section>`;
}

export function Payouts({ params, go }) {
  return html`
    <h1>Payouts and approvals</h1>
    <div class="grid two">
      <${Pending} go=${go} />
      <div class="card"><h2>Open a payout batch</h2>
        <${SearchForm} id="batch-id" label="Batch id" value=${params.batch} onSubmit=${(id) => go(`#/payouts/batch/${seg(id)}`)} /></div>
    </div>
    ${params.action && html`<${Action} key=${params.action} id=${params.action} go=${go} />`}
    ${params.batch && html`<${Batch} key=${params.batch} id=${params.batch} />`}`;
}
