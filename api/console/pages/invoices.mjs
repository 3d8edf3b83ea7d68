// Invoices: open one by id (there is no list endpoint), see its lines, tax and payments, get its PDF.
import { html, useState } from "../html.mjs";
import { get, download, seg } from "../api.mjs";
import { money, when } from "../format.mjs";
import { Fields, SearchForm, Status, Table, useLoad } from "../widgets.mjs";

function saveBytes(bytes, name, type) {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function Invoice({ id }) {
  const { value, error, busy } = useLoad(() => get(`/finance/invoice/${seg(id)}`), [id]);
  const [status, setStatus] = useState("");
  if (busy) return html`<p aria-busy="true">Loading invoice ${id}…</p>`;
  if (error) return html`<${Status} error text=${error.status === 404 ? `No invoice ${id}.` : error.message} />`;
  const inv = value;
  const pdf = async () => {
    try {
      saveBytes(await download(`/finance/invoice/${seg(id)}.pdf`), `${id}.pdf`, "application/pdf");
      setStatus(`Downloaded ${id}.pdf`);
    } catch (e) {
      setStatus(e.message);
    }
  };
  const m = (v) => money(v, inv.currency);
  return html`
    <section class="card" aria-labelledby="invoice-title" data-invoice=${inv.invoice_id}>
      <header class="card-head">
        <h2 id="invoice-title">Invoice ${inv.invoice_id} <span class=${`badge ${inv.status}`}>${inv.status}</span></h2>
        <button type="button" onClick=${pdf}>Download PDF</button>
      </header>
      <${Status} text=${status} />
      <${Fields} items=${[
        ["Buyer", inv.buyer?.name ?? inv.buyer?.id ?? inv.buyer?.buyer_id ?? JSON.stringify(inv.buyer)],
        ["Subtotal", m(inv.subtotal)], ["Tax", m(inv.tax)], ["Total", m(inv.total)],
        ["Paid", m(inv.amount_paid)], ["Due", inv.amount_due === null ? "—" : m(inv.amount_due)],
        ["Refunded", m(inv.amount_refunded)], ["Issued", when(inv.issued_at)], ["Due date", inv.due_date],
        ["Paid at", when(inv.paid_at)], ["Reverse charge", inv.reverse_charge ? "yes" : "no"],
      ]} />
      <${Table} caption="Lines" rows=${inv.line_items ?? []} columns=${[
        { key: "sku", label: "SKU" }, { key: "qty", label: "Qty", numeric: true },
        { key: "unit_price", label: "Unit price", numeric: true, render: (r) => m(r.unit_price) },
        { key: "net", label: "Net", numeric: true, render: (r) => m(r.net) },
        { key: "tax", label: "Tax", numeric: true, render: (r) => m(r.tax) },
        { key: "jurisdiction", label: "Jurisdiction" },
      ]} />
      <${Table} caption="Tax by rate" rows=${inv.tax_breakdown ?? []} columns=${[
        { key: "jurisdiction", label: "Jurisdiction" }, { key: "rate", label: "Rate" },
        { key: "reverse_charge", label: "Reverse charge", render: (r) => (r.reverse_charge ? "yes" : "no") },
        { key: "net", label: "Net", numeric: true, render: (r) => m(r.net) },
        { key: "tax", label: "Tax", numeric: true, render: (r) => m(r.tax) },
      ]} />
      <${Fields} items=${[["Journals", (inv.journal_ids ?? []).join(", ") || "—"], ["Payments", (inv.payments ?? []).join(", ") || "—"]]} />
    </section>`;
}

export function Invoices({ params, go }) {
  return html`
    <h1>Invoices</h1>
    <${SearchForm} id="invoice-id" label="Invoice id" value=${params.id} onSubmit=${(id) => go(`#/invoices/${seg(id)}`)}
      hint="The node has no invoice listing endpoint yet: open an invoice by its id." />
    ${params.id && html`<${Invoice} key=${params.id} id=${params.id} />`}`;
}
