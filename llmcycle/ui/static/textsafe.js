// Text from runs and models shown as what it is, as llmcycle/textsafe.py does in the terminal and the
// report: control characters but newline and tab replaced one for one by visible symbols (ESC as ␛,
// DEL as ␡, C1 controls as U+FFFD). The page sets all such text with textContent, never as HTML.
"use strict";

const TextSafe = (() => {
  const CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/g;

  function picture(ch) {
    const code = ch.charCodeAt(0);
    if (code < 0x20) return String.fromCharCode(0x2400 + code);
    return code === 0x7f ? "\u2421" : "\ufffd";
  }

  const visible = text => String(text).replace(CONTROL, picture);
  return {visible};
})();

if (typeof module !== "undefined") module.exports = TextSafe;  // for the tests (node)
