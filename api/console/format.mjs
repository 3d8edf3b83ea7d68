// Formatting: money arrives as integer minor units with an ISO 4217 code (never floats on the wire).
const decimalsCache = new Map();

export function decimals(currency) {
  if (!decimalsCache.has(currency)) {
    let digits = 2;
    try {
      digits = new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions()
        .maximumFractionDigits;
    } catch {
      /* unknown to the browser: assume 2 */
    }
    decimalsCache.set(currency, digits);
  }
  return decimalsCache.get(currency);
}

/** "1,234.56 EUR" from 123456 minor units, exact (string arithmetic on the integer). */
export function money(minor, currency) {
  if (minor === null || minor === undefined) return "—";
  const digits = decimals(currency);
  const negative = minor < 0;
  const text = String(Math.abs(minor)).padStart(digits + 1, "0");
  const whole = text.slice(0, text.length - digits) || "0";
  const fraction = digits ? `.${text.slice(text.length - digits)}` : "";
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${negative ? "-" : ""}${grouped}${fraction} ${currency}`;
}

export function when(text) {
  if (!text) return "—";
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? text : date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export const label = (name) => name.replaceAll("_", " ");
