// Small shared pieces of the pages: status line, error box, key/value list, tables, a loader hook.
import { html, useEffect, useState, useCallback } from "./html.mjs";

/** A polite live region: what just happened, announced to screen readers. */
export function Status({ text, error }) {
  return html`<p class=${error ? "status error" : "status"} role=${error ? "alert" : "status"} aria-live=${error ? "assertive" : "polite"}>${text || ""}</p>`;
}

export function Fields({ items }) {
  return html`<dl class="fields">${items.map(([k, v]) => html`<div key=${k}><dt>${k}</dt><dd>${v ?? "—"}</dd></div>`)}</dl>`;
}

/** A table of rows (objects) with columns [{key, label, render?}]; `caption` names it. */
export function Table({ caption, columns, rows, empty = "Nothing to show." }) {
  if (!rows.length) return html`<p class="muted">${empty}</p>`;
  return html`
    <div class="table-wrap" tabindex="0" role="region" aria-label=${caption}>
      <table>
        <caption>${caption}</caption>
        <thead><tr>${columns.map((c) => html`<th scope="col" key=${c.key}>${c.label ?? c.key}</th>`)}</tr></thead>
        <tbody>
          ${rows.map((row, i) => html`<tr key=${i}>${columns.map((c) => html`<td key=${c.key} class=${c.numeric ? "num" : ""}>${c.render ? c.render(row) : row[c.key] ?? "—"}</td>`)}</tr>`)}
        </tbody>
      </table>
    </div>`;
}

/** Run `load` when `deps` change; {value, error, busy, reload}. */
export function useLoad(load, deps) {
  const [state, setState] = useState({ value: null, error: null, busy: true });
  const reload = useCallback(() => {
    setState((s) => ({ ...s, busy: true }));
    load().then(
      (value) => setState({ value, error: null, busy: false }),
      (error) => setState({ value: null, error, busy: false }),
    );
  }, deps);
  useEffect(reload, [reload]);
  return { ...state, reload };
}

/** A labelled search field with a submit button. */
export function SearchForm({ id, label, value, onSubmit, button = "Open", hint }) {
  const [text, setText] = useState(value || "");
  const submit = (event) => {
    event.preventDefault();
    if (text.trim()) onSubmit(text.trim());
  };
  return html`
    <form class="inline" onSubmit=${submit}>
      <label for=${id}>${label}</label>
      <input id=${id} name=${id} value=${text} onInput=${(e) => setText(e.target.value)} autocomplete="off" aria-describedby=${hint ? `${id}-hint` : undefined} />
      <button type="submit">${button}</button>
      ${hint && html`<small id=${`${id}-hint`} class="muted">${hint}</small>`}
    </form>`;
}
