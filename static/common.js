// Helpers shared by the page's scripts (app.js, duplicates.js): building elements and calling the JSON API.
// Loaded first; it only defines window.cbir. Server text goes through textContent, never innerHTML.
(() => {
  'use strict';

  // <tag attrs…>children</tag>; attrs: text -> textContent, className, true -> a bare attribute, null/false -> none
  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'text') node.textContent = value;
      else if (key === 'className') node.className = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) node.append(child);
    return node;
  }

  // the answer's JSON body; a failure throws an Error whose message says why, with .status (0: no answer) and .body
  async function api(url, options) {
    let response;
    try {
      response = await fetch(url, { headers: { Accept: 'application/json' }, ...options });
    } catch (err) {
      throw Object.assign(new Error('the server cannot be reached (is it still running?)'), { status: 0, body: null });
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error ? body.error : `the request failed (${response.status} ${response.statusText})`;
      throw Object.assign(new Error(message), { status: response.status, body });
    }
    return body;
  }

  window.cbir = Object.freeze({ el, api });
})();
