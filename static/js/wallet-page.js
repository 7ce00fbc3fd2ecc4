// /wallet: the swap boxes, pending cards and history; pause state kept live.
import "./common.js";
import { bindPauseBanner, startHealth } from "./dashboard.js";
import { readJSON } from "./lib.js";
import { Wallet } from "./wallet.js";

const data = readJSON("wallet-data");
const health = startHealth({ root: null, interval: 8000 });
bindPauseBanner();
if (data) {
  new Wallet(data, { onFlowEnded: () => health.refreshSoon() });
}
