// The operator console's shell: sign-in, navigation, hash routes (#/page/...), focus on navigation.
import { html, render, useState, useEffect, useRef } from "./html.mjs";
import { get, token, signIn, signOut } from "./api.mjs";
import { Status } from "./widgets.mjs";
import { Dashboard } from "./pages/dashboard.mjs";
import { Invoices } from "./pages/invoices.mjs";
import { Reconcile } from "./pages/reconcile.mjs";
import { Payouts } from "./pages/payouts.mjs";
import { Proofs } from "./pages/proofs.mjs";
import { Health } from "./pages/health.mjs";

const PAGES = [
  { path: "dashboard", title: "Dashboard", view: Dashboard },
  { path: "invoices", title: "Invoices", view: Invoices },
  { path: "reconcile", title: "Reconciliation", view: Reconcile },
  { path: "payouts", title: "Payouts and approvals", view: Payouts },
  { path: "proofs", title: "Proofs", view: Proofs },
  { path: "health", title: "Health", view: Health },
];

/** "#/payouts/action/x" -> {page, params: {action: "x"}}; "#/invoices/INV-1" -> {id}. */
export function parseRoute(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const page = PAGES.find((p) => p.path === parts[0]) ?? PAGES[0];
  const params = {};
  if (parts.length === 2) params.id = parts[1];
  if (parts.length === 3) params[parts[1]] = parts[2];
  return { page, params };
}

function SignIn({ onSignedIn }) {
  const [value, setValue] = useState("");
  const [status, setStatus] = useState({ text: "" });
  const submit = async (event) => {
    event.preventDefault();
    signIn(value.trim());
    setStatus({ text: "Checking the token…" });
    try {
      await get("/finance/approvals?status=pending_approval&limit=1");
      onSignedIn();
    } catch (e) {
      signOut();
      setStatus({ text: e.status === 401 ? "The node does not know this token." : e.message, error: true });
    }
  };
  return html`
    <main id="main" class="signin">
      <form class="card stack" onSubmit=${submit} aria-labelledby="signin-title">
        <h1 id="signin-title">Ledger Node operator console</h1>
        <label for="token">Operator token</label>
        <input id="token" type="password" autocomplete="off" value=${value} onInput=${(e) => setValue(e.target.value)} required
          aria-describedby="token-hint" />
        <small id="token-hint" class="muted">Kept in this tab's session storage only, sent as a bearer token with every call.</small>
        <button type="submit">Sign in</button>
        <${Status} text=${status.text} error=${status.error} />
      </form>
    </main>`;
}

function Shell({ onSignOut }) {
  const [hash, setHash] = useState(location.hash || "#/dashboard");
  const main = useRef(null);
  useEffect(() => {
    const changed = () => setHash(location.hash || "#/dashboard");
    addEventListener("hashchange", changed);
    return () => removeEventListener("hashchange", changed);
  }, []);
  const { page, params } = parseRoute(hash);
  useEffect(() => {
    document.title = `${page.title} · Ledger Node console`;
    main.current?.focus();
  }, [page.path]);
  const go = (target) => {
    location.hash = target;
  };
  const View = page.view;
  return html`
    <header class="top">
      <span class="brand">Ledger Node</span>
      <nav aria-label="Console pages"><ul>
        ${PAGES.map((p) => html`<li key=${p.path}><a href=${`#/${p.path}`} aria-current=${p === page ? "page" : undefined}>${p.title}</a></li>`)}
      </ul></nav>
      <button type="button" class="small" onClick=${onSignOut}>Sign out</button>
    </header>
    <main id="main" ref=${main} tabindex="-1"><${View} key=${page.path} params=${params} go=${go} /></main>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(token()));
  const out = () => {
    signOut();
    setSignedIn(false);
  };
  return signedIn ? html`<${Shell} onSignOut=${out} />` : html`<${SignIn} onSignedIn=${() => setSignedIn(true)} />`;
}

const root = document.getElementById("app");
root.textContent = ""; // the "Loading" placeholder: render() appends beside existing children
render(html`<${App} />`, root);
