// A horizontal bar chart drawn as SVG by the console itself (no chart library, no CDN).
import { html } from "./html.mjs";
import { money } from "./format.mjs";

const WIDTH = 460;
const BAR = 22;
const GAP = 8;
const LABEL = 130;

/** Bars for [{label, value}] in minor units of `currency`; negative values draw to the left of 0. */
export function BarChart({ title, bars, currency }) {
  if (!bars.length) return html`<p class="muted">Nothing to chart.</p>`;
  const span = Math.max(1, ...bars.map((b) => Math.abs(b.value)));
  const negative = bars.some((b) => b.value < 0);
  const plot = WIDTH - LABEL - 10;
  const zero = LABEL + (negative ? plot / 2 : 0);
  const scale = (negative ? plot / 2 : plot) / span;
  const height = bars.length * (BAR + GAP) + GAP;
  const summary = bars.map((b) => `${b.label}: ${money(b.value, currency)}`).join("; ");
  return html`
    <figure class="chart">
      <svg viewBox="0 0 ${WIDTH} ${height}" width="100%" role="img" aria-label=${`${title}. ${summary}`}>
        <title>${title}</title>
        <line x1=${zero} x2=${zero} y1="0" y2=${height} class="axis" />
        ${bars.map((b, i) => {
          const y = GAP + i * (BAR + GAP);
          const w = Math.max(1, Math.abs(b.value) * scale);
          const x = b.value < 0 ? zero - w : zero;
          return html`
            <g key=${b.label}>
              <text x=${LABEL - 6} y=${y + BAR * 0.7} text-anchor="end" class="bar-label">${b.label}</text>
              <rect x=${x} y=${y} width=${w} height=${BAR} class=${b.value < 0 ? "bar negative" : "bar"} />
            </g>`;
        })}
      </svg>
      <figcaption>${title}</figcaption>
    </figure>`;
}
