// /ops: the pause banner follows the system while the page is open.
import "./common.js";
import { bindPauseBanner, startHealth } from "./dashboard.js";

startHealth({ root: null, interval: 5000 });
bindPauseBanner();

// While a system check runs, show its table as soon as it is there.
if (document.querySelector("[data-check-running]")) {
  setTimeout(() => location.reload(), 2000);
}
