// Behaviour every page shares.
import { initCopyButtons } from "./lib.js";

initCopyButtons();
