// /flows/<id>: while the flow is pending, re-render the timeline as hops arrive.
import "./common.js";
import { debounce } from "./lib.js";
import { watchFlow } from "./live.js";

const root = document.getElementById("flow-root");

async function refresh() {
  const response = await fetch(`${location.pathname}?partial=1`, { credentials: "same-origin" });
  if (response.ok) root.innerHTML = await response.text();
}

if (root && root.dataset.status === "pending") {
  const soon = debounce(refresh, 250);
  watchFlow(root.dataset.flow, {
    onHop: soon,
    onEnd: () => { root.dataset.status = "done"; setTimeout(refresh, 150); },
  });
}
