// The search page: pick, drop or paste an image, see the ranked database; select a result to search with it.
// Vanilla JS, no dependencies; all text from the server goes through textContent, never innerHTML.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const els = {
    body: document.body,
    dropzone: $('dropzone'),
    fileInput: $('file-input'),
    choose: $('choose-button'),
    preview: $('query-preview'),
    previewImage: $('query-image'),
    previewCaption: $('query-caption'),
    hint: $('drop-hint'),
    kSelect: $('k-select'),
    heading: $('results-heading'),
    status: $('status'),
    error: $('error'),
    grid: $('grid'),
    more: $('more-button'),
  };
  const maxUpload = Number(els.body.dataset.maxUpload) || 20 * 1024 * 1024;
  const state = {
    query: null,        // {kind: 'upload', file} | {kind: 'id', id, path}
    shown: 0,           // results on screen
    version: els.body.dataset.version || null,
    previewUrl: null,
    seq: 0,             // the latest request; answers to older ones are dropped
    indexLoaded: Boolean(els.body.dataset.version),
  };

  // ------------------------------------------------------------------ small helpers

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

  function formatBytes(bytes) {
    if (bytes >= 1024 * 1024) return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
    if (bytes >= 1024) return `${Math.round(bytes / 1024)} kB`;
    return `${bytes} bytes`;
  }

  function showError(message, ...extra) {
    els.error.replaceChildren(capitalize(message), ...extra);
    els.error.hidden = false;
  }

  function clearError() {
    els.error.hidden = true;
    els.error.textContent = '';
  }

  function setBusy(busy, message) {
    els.dropzone.classList.toggle('busy', busy);
    els.grid.setAttribute('aria-busy', busy ? 'true' : 'false');
    if (message !== undefined) els.status.textContent = message;
  }

  async function api(url, options) {
    let response;
    try {
      response = await fetch(url, { headers: { Accept: 'application/json' }, ...options });
    } catch (err) {
      throw Object.assign(new Error('The server cannot be reached. Is it still running?'), { status: 0 });
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      let message = body && body.error ? body.error : `The request failed (${response.status} ${response.statusText}).`;
      if (response.status === 413 && !(body && body.error)) message = `File too large: the limit is ${formatBytes(maxUpload)}.`;
      throw Object.assign(new Error(message), { status: response.status, body });
    }
    return body;
  }

  function capitalize(text) {
    return text ? text.charAt(0).toUpperCase() + text.slice(1) : text;
  }

  // ------------------------------------------------------------------ database info

  function renderInfo(info) {
    $('info-size').textContent = String(info.size);
    $('info-backbone').textContent = info.backbone;
    $('info-pooling').textContent = info.pooling;
    $('info-dimension').textContent = String(info.dimension);
    $('info-updated').textContent = info.updated ? info.updated.slice(0, 16).replace('T', ' ') : '–';
    state.version = info.version;
    state.indexLoaded = true;
  }

  async function loadInfo() {
    try {
      renderInfo(await api('/api/info'));
      return true;
    } catch (err) {
      state.indexLoaded = false;
      if (err.status === 503) {
        els.heading.textContent = 'No index loaded';
        els.grid.replaceChildren();
        els.more.hidden = true;
        els.status.textContent = '';
        showError(`${err.message}, for example `, el('code', { text: 'python index.py --database database --index index/demo.h5' }),
          '. This page starts by itself once the server has loaded it.');
        waitForIndex();
      } else {
        showError(err.message);
      }
      return false;
    }
  }

  // the server picks up a new index file by itself; look again now and then, and start when it is there
  let waiting = null;
  function waitForIndex() {
    if (waiting) return;
    waiting = window.setInterval(async () => {
      try {
        const info = await api('/api/info');
        window.clearInterval(waiting);
        waiting = null;
        renderInfo(info);
        clearError();
        loadSample();
      } catch (err) { /* still no index */ }
    }, 5000);
  }

  // ------------------------------------------------------------------ the grid

  // a path with line-break opportunities after each "/", so long names wrap at folder boundaries
  function pathParts(path) {
    const parts = [];
    path.split('/').forEach((part, i, all) => {
      parts.push(i < all.length - 1 ? `${part}/` : part);
      if (i < all.length - 1) parts.push(document.createElement('wbr'));
    });
    return parts;
  }

  function card(item, hit) {
    const label = hit
      ? `Search with ${item.path} (rank ${hit.rank}, score ${hit.score.toFixed(3)})`
      : `Search with ${item.path}`;
    const image = el('img', { src: item.thumb_url, alt: item.path, loading: 'lazy', decoding: 'async' });
    const button = el('button', { type: 'button', className: 'card-search', 'aria-label': label, 'data-id': item.id }, [image]);
    if (hit) button.append(el('span', { className: 'rank', 'aria-hidden': 'true', text: `#${hit.rank}` }));
    const meta = el('div', { className: 'card-meta' }, [el('span', { className: 'path', title: item.path }, pathParts(item.path))]);
    if (hit) {
      const score = Math.max(0, Math.min(1, hit.score));
      const bar = el('span', { className: 'score-bar', 'aria-hidden': 'true' }, [el('span')]);
      bar.firstChild.style.width = `${(score * 100).toFixed(1)}%`;
      meta.append(el('span', { className: 'score', text: `score ${hit.score.toFixed(3)}` }), bar);
    }
    meta.append(el('a', {
      className: 'open', href: item.image_url, target: '_blank', rel: 'noopener', text: 'Full size',
      'aria-label': `Open ${item.path} at full size`,
    }));
    const attrs = { className: 'card', 'data-id': item.id };
    if (hit) Object.assign(attrs, { 'data-rank': hit.rank, 'data-score': hit.score });
    return el('li', attrs, [button, meta]);
  }

  els.grid.addEventListener('click', (event) => {
    const button = event.target.closest('button.card-search');
    if (!button) return;
    const item = button.closest('.card');
    searchId(Number(button.dataset.id), item.querySelector('.path').textContent, item.querySelector('img').src);
  });

  async function loadSample() {
    const seq = ++state.seq;
    try {
      const data = await api('/api/sample');
      if (seq !== state.seq) return;
      state.version = data.version;
      els.grid.replaceChildren(...data.items.map((item) => card(item, null)));
      els.grid.classList.add('sample');
      els.heading.textContent = 'A sample of the database';
      els.status.textContent = `${data.items.length} of ${data.total} images. Select one, or choose your own image, to search.`;
      els.more.hidden = true;
    } catch (err) {
      if (seq === state.seq && err.status !== 503) showError(err.message);
    }
  }

  // ------------------------------------------------------------------ searching

  function showQueryPreview(src, caption) {
    els.previewImage.src = src;
    els.previewImage.alt = `Query: ${caption}`;
    els.previewCaption.textContent = caption;
    els.preview.hidden = false;
    els.hint.hidden = true;
    els.choose.textContent = 'Choose another image…';
  }

  function searchFile(file) {
    clearError();
    if (!file) return;
    if (file.size > maxUpload) {
      showError(`${file.name} is too large (${formatBytes(file.size)}); the limit is ${formatBytes(maxUpload)}.`);
      return;
    }
    if (file.size === 0) {
      showError(`${file.name || 'The file'} is empty.`);
      return;
    }
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    showQueryPreview(state.previewUrl, `${file.name || 'pasted image'} · ${formatBytes(file.size)}`);
    state.query = { kind: 'upload', file };
    if (new URLSearchParams(window.location.search).has('id')) history.pushState({}, '', window.location.pathname);
    run(0);
  }

  function searchId(id, path, thumbUrl, push = true) {
    clearError();
    state.query = { kind: 'id', id, path };
    showQueryPreview(thumbUrl || `/thumb/${id}`, path ? `${path} · database image #${id}` : `database image #${id}`);
    if (push) history.pushState({ id }, '', `?id=${id}`);
    run(0);
  }

  async function run(offset) {
    const query = state.query;
    if (!query) return;
    const k = Number(els.kSelect.value);
    const seq = ++state.seq;
    setBusy(true, offset ? 'Loading more…' : 'Searching…');
    els.more.disabled = true;
    try {
      let data;
      if (query.kind === 'upload') {
        const form = new FormData();
        form.append('image', query.file, query.file.name || 'pasted-image');
        form.append('k', String(k));
        form.append('offset', String(offset));
        data = await api('/api/search', { method: 'POST', body: form });
      } else {
        const params = new URLSearchParams({ id: String(query.id), k: String(k), offset: String(offset) });
        if (state.version) params.set('v', state.version);
        data = await api(`/api/search?${params}`);
        if (data.query && data.query.path) {
          query.path = data.query.path;
          els.previewCaption.textContent = `${data.query.path} · database image #${query.id}`;
          els.previewImage.alt = `Query: ${data.query.path}`;
        }
      }
      if (seq !== state.seq) return;
      if (state.version && data.version !== state.version) loadInfo();  // the index was updated meanwhile
      state.version = data.version;
      render(data, offset > 0);
    } catch (err) {
      if (seq !== state.seq) return;
      setBusy(false, '');
      if (err.status === 409) {  // the database changed under this id: start again from the new version
        await loadInfo();
        await loadSample();
        showError('The database was updated; showing the new version. Choose your query again.');
      } else if (err.status === 503) {
        await loadInfo();
      } else {
        if (query.kind === 'upload') clearQuery();  // the picture was not usable: do not keep showing it
        showError(err.message);
      }
    } finally {
      if (seq === state.seq) {
        els.dropzone.classList.remove('busy');
        els.grid.setAttribute('aria-busy', 'false');
        els.more.disabled = false;
      }
    }
  }

  function render(data, append) {
    const cards = data.results.map((hit) => card(hit, hit));
    if (append) els.grid.append(...cards);
    else els.grid.replaceChildren(...cards);
    els.grid.classList.remove('sample');
    state.shown = data.offset + data.results.length;
    els.heading.textContent = 'Most similar images';
    els.status.textContent = `Top ${state.shown} of ${data.total} · ${data.took_ms.toFixed(0)} ms`;
    els.more.hidden = !data.has_more;
    if (!append) {
      window.scrollTo({ top: Math.min(window.scrollY, els.heading.getBoundingClientRect().top + window.scrollY - 16) });
    }
  }

  // ------------------------------------------------------------------ picking, dropping, pasting

  els.choose.addEventListener('click', () => els.fileInput.click());
  els.fileInput.addEventListener('change', () => {
    const file = els.fileInput.files && els.fileInput.files[0];
    searchFile(file);
    els.fileInput.value = '';  // choosing the same file again searches again
  });
  els.kSelect.addEventListener('change', () => { if (state.query) run(0); });
  els.more.addEventListener('click', () => run(state.shown));

  // a file dropped anywhere on the page is a query; never let the browser navigate to it
  let dragDepth = 0;
  document.addEventListener('dragenter', (event) => {
    if (!event.dataTransfer) return;
    dragDepth += 1;
    els.dropzone.classList.add('dragging');
  });
  document.addEventListener('dragleave', () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) els.dropzone.classList.remove('dragging');
  });
  document.addEventListener('dragover', (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = 'copy';
  });
  document.addEventListener('drop', (event) => {
    event.preventDefault();
    dragDepth = 0;
    els.dropzone.classList.remove('dragging');
    const transfer = event.dataTransfer;
    if (!transfer) return;
    if (transfer.files && transfer.files.length) {
      searchFile(transfer.files[0]);
      return;
    }
    // a thumbnail dragged from this page: search with that database image
    const uri = transfer.getData('text/uri-list') || transfer.getData('text/plain');
    try {
      const url = new URL(uri.trim().split('\n')[0], window.location.href);
      const match = url.origin === window.location.origin && url.pathname.match(/^\/(?:thumb|image)\/(\d+)$/);
      if (match) {
        searchId(Number(match[1]), '', url.href);
        return;
      }
    } catch (err) { /* not a URL */ }
    showError('Drop an image file here (from your computer), or use “Choose an image…”.');
  });

  document.addEventListener('paste', (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
    const item = items.find((entry) => entry.kind === 'file' && entry.type.startsWith('image/'));
    if (!item) return;
    event.preventDefault();
    searchFile(item.getAsFile());
  });

  window.addEventListener('popstate', () => {
    const id = new URLSearchParams(window.location.search).get('id');
    if (id !== null && /^\d+$/.test(id)) searchId(Number(id), '', null, false);
    else resetToSample();
  });

  function clearQuery() {
    state.query = null;
    els.preview.hidden = true;
    els.previewImage.removeAttribute('src');
    els.hint.hidden = false;
    els.choose.textContent = 'Choose an image…';
  }

  function resetToSample() {
    clearQuery();
    loadSample();
  }

  // ------------------------------------------------------------------ start

  async function start() {
    const loaded = await loadInfo();
    if (!loaded) return;
    const id = new URLSearchParams(window.location.search).get('id');
    if (id !== null && /^\d+$/.test(id)) searchId(Number(id), '', null, false);
    else loadSample();
  }

  els.body.classList.add('js');
  start();
})();
