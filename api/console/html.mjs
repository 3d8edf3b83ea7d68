// The console's view layer: Preact with htm tagged templates (vendored, see vendor/VENDOR.md).
import { h, render, Fragment } from "./vendor/preact.mjs";
import htm from "./vendor/htm.mjs";

export const html = htm.bind(h);
export { render, Fragment };
export { useState, useEffect, useRef, useCallback, useMemo } from "./vendor/hooks.mjs";
