// Dashboard: the finance reports (GET /finance/reports/{name}) with totals and SVG charts.
import { html } from "../html.mjs";
import { get } from "../api.mjs";
import { money, label, when } from "../format.mjs";
import { BarChart } from "../chart.mjs";
import { Status, useLoad } from "../widgets.mjs";

const sumBy = (rows, key, value) => {
  const sums = new Map();
  for (const row of rows) sums.set(row[key] ?? "—", (sums.get(row[key] ?? "—") ?? 0) + (row[value] ?? 0));
  return [...sums].map(([k, v]) => ({ label: String(k), value: v }));
};

/** Each report and how its chart is drawn for one currency. */
export const REPORTS = [
  { name: "cash_position", title: "Cash position", bars: (r, c) => sumBy(rowsIn(r, c), "provider", "amount") },
  { name: "ar_aging", title: "Receivables ageing",
    bars: (r, c) => ["current", "1-30", "31-60", "61-90", "90+"].map((b) => ({ label: b, value: r.totals[c]?.[b] ?? 0 })) },
  { name: "payout_liabilities", title: "Payout liabilities",
    bars: (r, c) => ["payable", "holdback", "in_transit"].map((b) => ({ label: label(b), value: r.totals[c]?.[b] ?? 0 })) },
  { name: "vat_owed", title: "VAT owed", bars: (r, c) => sumBy(rowsIn(r, c), "jurisdiction", "amount") },
  { name: "revenue", title: "Revenue (net, by month)", bars: (r, c) => sumBy(rowsIn(r, c), "period", "net") },
];

const rowsIn = (report, currency) => report.rows.filter((row) => row.currency === currency);

function Totals({ report }) {
  const currencies = Object.keys(report.totals).sort();
  if (!currencies.length) return html`<p class="muted">No figures yet.</p>`;
  return html`
    <table class="totals">
      <caption class="visually-hidden">${report.name} totals</caption>
      <thead><tr><th scope="col">Currency</th><th scope="col">Figure</th><th scope="col" class="num">Total</th></tr></thead>
      <tbody>
        ${currencies.flatMap((c) => Object.keys(report.totals[c]).sort().map((k) => html`
          <tr key=${`${c}-${k}`}>
            <th scope="row">${c}</th><td>${label(k)}</td>
            <td class="num" data-total=${`${report.name}:${c}:${k}`} data-minor=${report.totals[c][k]}>${money(report.totals[c][k], c)}</td>
          </tr>`))}
      </tbody>
    </table>`;
}

function ReportCard({ spec }) {
  const { value, error, busy, reload } = useLoad(() => get(`/finance/reports/${spec.name}`), [spec.name]);
  const report = value?.report;
  const currencies = report ? Object.keys(report.totals).sort().slice(0, 3) : [];
  return html`
    <section class="card" aria-labelledby=${`h-${spec.name}`} aria-busy=${busy ? "true" : "false"} data-report=${spec.name}>
      <header class="card-head">
        <h2 id=${`h-${spec.name}`}>${spec.title}</h2>
        <button type="button" class="small" onClick=${reload} aria-label=${`Refresh ${spec.title}`}>Refresh</button>
      </header>
      ${error && html`<${Status} error text=${error.message} />`}
      ${report && html`
        <p class="muted">As of ${when(report.as_of)} · ${report.rows.length} row(s)</p>
        <${Totals} report=${report} />
        ${currencies.map((c) => html`<${BarChart} key=${c} title=${`${spec.title}, ${c}`} currency=${c} bars=${spec.bars(report, c)} />`)}`}
    </section>`;
}

export function Dashboard() {
  return html`
    <h1>Dashboard</h1>
    <p class="muted">Every figure is derived from the ledger (docs/accounting.md); amounts are exact minor units.</p>
    <div class="grid">${REPORTS.map((spec) => html`<${ReportCard} key=${spec.name} spec=${spec} />`)}</div>`;
}
