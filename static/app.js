// The search page: pick, drop or paste an image, see the ranked database; select a result to search with it.
// Vanilla JS, no dependencies; all text from the server goes through textContent, never innerHTML.
//
// One rule keeps the page honest: what is on screen (query preview, grid, URL, title) is one "view", and a view
// changes only when a request for a new one succeeds. A failed request leaves the view as it was and says why, with
// a way to try again. The URL holds id, k, folder and offset; an upload's bytes ride in history.state, so Back and
// Forward restore it too.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const els = {
    body: document.body,
    dropzone: $('dropzone'),
    queryPanel: document.querySelector('.query-panel'),
    fileInput: $('file-input'),
    choose: $('choose-button'),
    busy: $('busy'),
    busyText: $('busy-text'),
    preview: $('query-preview'),
    previewImage: $('query-image'),
    previewCaption: $('query-caption'),
    previewMeta: $('query-meta'),
    previewLinks: $('query-links'),
    previewOpen: $('query-open'),
    previewDownload: $('query-download'),
    hint: $('drop-hint'),
    kSelect: $('k-select'),
    folderControl: $('folder-control'),
    folderSelect: $('folder-select'),
    heading: $('results-heading'),
    status: $('status'),
    error: $('error'),
    errorText: $('error-text'),
    errorAction: $('error-action'),
    noIndex: $('no-index'),
    grid: $('grid'),
    more: $('more-button'),
    help: $('help'),
    helpButton: $('help-button'),
    helpClose: $('help-close'),
  };
  const maxUpload = Number(els.body.dataset.maxUpload) || 20 * 1024 * 1024;
  const defaultK = Number(els.body.dataset.defaultK) || 10;
  const maxK = Number(els.body.dataset.maxK) || 200;
  const WHOLE = /^(0|[1-9][0-9]{0,11})$/;  // ids, k and offsets: ASCII digits without leading zeros
  const THUMB_SLOTS = 3;  // thumbnails loading at once: fewer than the server's threads (4 by default)
  const state = {
    view: null,         // what is on screen: {query, k, folder, start, shown, total, hasMore, version, lastOffset}
    version: els.body.dataset.version || null,
    indexLoaded: Boolean(els.body.dataset.version),
    seq: 0,             // the latest request; answers to older ones are dropped
    busy: false,
    previewUrl: null,
    pending: null,      // a query from the URL that waits for an index to appear
    errorAction: null,
  };

  // ------------------------------------------------------------------ small helpers

  const { el } = window.cbir;

  function formatBytes(bytes) {
    if (bytes >= 1024 * 1024) {
      const mb = bytes / 1024 / 1024;
      return `${Number.isInteger(mb) ? mb : mb.toFixed(1)}\u00a0MB`;
    }
    if (bytes >= 1024) return `${Math.round(bytes / 1024)}\u00a0kB`;
    return `${bytes} bytes`;
  }

  // "25.3 MB (26,531,840 bytes)": near the limit the rounded figure alone cannot show which side a file is on
  function exactBytes(bytes) {
    return `${formatBytes(bytes)} (${bytes.toLocaleString('en-US')} bytes)`;
  }

  function facts(item) {
    const parts = [];
    if (item.width && item.height) parts.push(`${item.width} × ${item.height}`);
    if (typeof item.bytes === 'number') parts.push(formatBytes(item.bytes));
    return parts.join(' · ');
  }

  function sentence(text) {
    const trimmed = String(text).trim();
    return /[.!?]$/.test(trimmed) ? trimmed : `${trimmed}.`;
  }

  function describe(query) {
    if (!query) return '';
    if (query.kind === 'upload') return query.name;
    return query.path || `database image #${query.id}`;
  }

  // ------------------------------------------------------------------ messages

  function showError(text, action) {
    els.errorText.textContent = text;
    state.errorAction = action ? action.run : null;
    els.errorAction.hidden = !action;
    if (action) els.errorAction.textContent = action.label;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.hidden = true;
    els.errorText.textContent = '';
    els.errorAction.hidden = true;
    state.errorAction = null;
  }

  els.errorAction.addEventListener('click', () => {
    const action = state.errorAction;
    if (action) action();
  });

  function stillShown() {
    const view = state.view;
    return view && view.query ? ` The results shown are still those for “${describe(view.query)}”.` : '';
  }

  function setBusy(busy, message) {
    state.busy = busy;
    els.busy.classList.toggle('active', busy);
    els.busyText.textContent = busy ? message : '';
    els.body.classList.toggle('busy-page', busy);
    els.grid.setAttribute('aria-busy', busy ? 'true' : 'false');
    // aria-disabled, not disabled: a disabled button loses keyboard focus to <body>
    els.choose.setAttribute('aria-disabled', busy || !state.indexLoaded ? 'true' : 'false');
    els.more.setAttribute('aria-disabled', busy ? 'true' : 'false');
  }

  // the JSON API, with the upload limit named when the server refuses a file as too large without saying why
  async function api(url, options) {
    try {
      return await window.cbir.api(url, options);
    } catch (err) {
      if (err.status === 413 && !(err.body && err.body.error)) err.message = `file too large: the limit is ${exactBytes(maxUpload)}`;
      throw err;
    }
  }

  // ------------------------------------------------------------------ database info and folders

  function renderInfo(info) {
    $('info-size').textContent = String(info.size);
    $('info-backbone').textContent = info.backbone;
    $('info-pooling').textContent = info.pooling;
    $('info-dimension').textContent = String(info.dimension);
    $('info-updated').textContent = info.updated ? info.updated.slice(0, 16).replace('T', ' ') : '–';
    state.version = info.version;
  }

  async function refreshInfo() {
    try {
      renderInfo(await api('/api/info'));
      loadFolders();
    } catch (err) { /* the header keeps what it showed */ }
  }

  function noteVersion(version) {
    if (state.version && version && version !== state.version) {
      state.version = version;
      refreshInfo();  // the index was updated meanwhile: new size, new folders
    }
    state.version = version || state.version;
  }

  function ensureOption(select, value, label) {
    const text = String(value);
    if (![...select.options].some((option) => option.value === text)) select.append(el('option', { value: text, text: label }));
    select.value = text;
  }

  function setK(k) {
    const options = [...els.kSelect.options];
    if (!options.some((option) => Number(option.value) === k)) {
      const option = el('option', { value: k, text: String(k) });
      const after = options.find((o) => Number(o.value) > k);
      els.kSelect.insertBefore(option, after || null);
    }
    els.kSelect.value = String(k);
  }

  function setFolder(folder) {
    if (folder) {
      ensureOption(els.folderSelect, folder, `${folder}/`);
      els.folderControl.hidden = false;
    } else {
      els.folderSelect.value = '';
    }
  }

  async function loadFolders() {
    let data;
    try {
      data = await api('/api/folders');
    } catch (err) {
      return;  // the filter is an extra: without the list it keeps what it has
    }
    const current = state.view ? state.view.folder : els.folderSelect.value;
    const options = [el('option', { value: '', text: 'All folders' })];
    for (const entry of data.folders) {
      const images = entry.count === 1 ? '1 image' : `${entry.count} images`;
      options.push(el('option', { value: entry.folder, text: `${entry.folder}/ (${images})` }));
    }
    els.folderSelect.replaceChildren(...options);
    els.folderControl.hidden = data.folders.length === 0 && !current;
    setFolder(current || '');
  }

  // ------------------------------------------------------------------ thumbnails: a few at a time, near the viewport

  // Every thumbnail is one request; a page of 24 fired at once queues behind the server's threads (waitress logs
  // "Task queue depth" for each). Loading them THUMB_SLOTS at a time, best rank first, keeps the queue empty and
  // costs nothing visible: cached thumbnails load instantly, new ones are made faster than the grid can be read.
  const thumbs = (() => {
    const queue = [];
    let active = 0;
    const observer = 'IntersectionObserver' in window
      ? new IntersectionObserver((entries) => {
        for (const entry of entries) {
          if (entry.isIntersecting) {
            observer.unobserve(entry.target);
            queue.push(entry.target);
          }
        }
        pump();
      }, { rootMargin: '400px 0px' })
      : null;

    function pump() {
      while (active < THUMB_SLOTS && queue.length) {
        const img = queue.shift();
        const src = img.dataset.src;
        if (!src || !img.isConnected) continue;
        delete img.dataset.src;
        active += 1;
        let done = false;
        const finish = (failed) => {
          if (done) return;
          done = true;
          if (failed) img.classList.add('missing');
          active -= 1;
          pump();
        };
        img.addEventListener('load', () => finish(false), { once: true });
        img.addEventListener('error', () => finish(true), { once: true });
        img.src = src;
      }
    }

    return {
      add(img) {
        if (observer) observer.observe(img);
        else {
          queue.push(img);
          pump();
        }
      },
      forget(root) {
        if (!observer) return;
        for (const img of root.querySelectorAll('img[data-src]')) observer.unobserve(img);
      },
    };
  })();

  // ------------------------------------------------------------------ the grid

  // a path as its folder (one muted line, cut short with "…" when long) above its file name (up to two lines):
  // it never breaks inside a folder name, and the file name is always seen; the tooltip has the whole path
  function pathParts(path) {
    const cut = path.lastIndexOf('/');
    const folder = cut >= 0 ? path.slice(0, cut + 1) : '';
    const name = path.slice(cut + 1);
    return [el('span', { className: 'folder', text: folder }), el('span', { className: 'name', text: name })];
  }

  function card(item, hit) {
    // the name starts with the visible "#1", so what is seen is what a speech user says
    const verified = hit && hit.verified ? `, verified copy (${hit.inliers} matching points)` : '';
    const label = hit
      ? `#${hit.rank} ${item.path}, score ${hit.score.toFixed(3)}${verified}. Search with this image`
      : `${item.path}. Search with this image`;
    const image = el('img', { alt: item.path, decoding: 'async' });
    image.dataset.src = item.thumb_url;
    thumbs.add(image);
    // one tab stop for the whole grid (arrow keys move inside it), so only one button is tabbable at a time
    const button = el('button', { type: 'button', className: 'card-search', 'aria-label': label, 'data-id': item.id, tabindex: '-1' }, [image]);
    if (hit) button.append(el('span', { className: 'rank', 'aria-hidden': 'true', text: `#${hit.rank}` }));
    const meta = el('div', { className: 'card-meta' }, [el('span', { className: 'path', title: item.path }, pathParts(item.path))]);
    if (hit) {
      const score = Math.max(0, Math.min(1, hit.score));
      const bar = el('span', { className: 'score-bar', 'aria-hidden': 'true' }, [el('span')]);
      bar.firstChild.style.width = `${(score * 100).toFixed(1)}%`;
      meta.append(el('span', { className: 'score', text: `score ${hit.score.toFixed(3)}` }), bar);
      if (hit.verified) {
        // geometric verification (index built with --preset copy-detection): a copy of this image was found in the query
        meta.append(el('span', {
          className: 'verified', title: `${hit.inliers} local features agree on one transform`,
          text: `\u2713 verified \u00b7 ${hit.inliers} inliers`,
        }));
      }
    }
    const about = facts(item);
    if (about) meta.append(el('span', { className: 'facts', text: about }));
    meta.append(el('span', { className: 'links' }, [
      el('a', { className: 'open', href: item.image_url, target: '_blank', rel: 'noopener', tabindex: '-1' },
        ['Original', el('span', { className: 'visually-hidden', text: ` of ${item.path}` })]),
      el('a', { className: 'download', href: item.download_url, download: '', tabindex: '-1' },
        ['Download', el('span', { className: 'visually-hidden', text: ` ${item.path}` })]),
    ]));
    const attrs = { className: 'card', 'data-id': item.id, 'data-path': item.path };
    if (hit) Object.assign(attrs, { 'data-rank': hit.rank, 'data-score': hit.score });
    if (hit && hit.verified) attrs['data-inliers'] = hit.inliers;
    return el('li', attrs, [button, meta]);
  }

  function cardButtons() {
    return [...els.grid.querySelectorAll('button.card-search')];
  }

  function setActive(button, focus) {
    for (const other of els.grid.querySelectorAll('button.card-search[tabindex="0"]')) {
      if (other !== button) other.tabIndex = -1;
    }
    if (!button) return;
    button.tabIndex = 0;
    if (focus) button.focus();
  }

  function replaceGrid(cards) {
    thumbs.forget(els.grid);
    els.grid.replaceChildren(...cards);
    setActive(els.grid.querySelector('button.card-search'), false);
  }

  function gridColumns() {
    return getComputedStyle(els.grid).gridTemplateColumns.split(' ').filter(Boolean).length || 1;
  }

  els.grid.addEventListener('focusin', (event) => {
    const button = event.target.closest('button.card-search');
    if (button) setActive(button, false);
  });

  els.grid.addEventListener('keydown', (event) => {
    const button = event.target.closest('button.card-search');
    if (!button || event.ctrlKey || event.metaKey || event.altKey) return;
    const buttons = cardButtons();
    const at = buttons.indexOf(button);
    const columns = gridColumns();
    const moves = {
      ArrowRight: at + 1, ArrowLeft: at - 1, ArrowDown: at + columns, ArrowUp: at - columns,
      Home: 0, End: buttons.length - 1,
    };
    if (event.key in moves) {
      event.preventDefault();
      const to = moves[event.key];
      if (to >= 0 && to < buttons.length) setActive(buttons[to], true);
      return;
    }
    const item = button.closest('.card');
    if (event.key === 'o' || event.key === 'O') {
      event.preventDefault();
      window.open(item.querySelector('a.open').href, '_blank', 'noopener');
    } else if (event.key === 'd' || event.key === 'D') {
      event.preventDefault();
      item.querySelector('a.download').click();
    }
  });

  els.grid.addEventListener('click', (event) => {
    const button = event.target.closest('button.card-search');
    if (!button) return;
    const item = button.closest('.card');
    searchWith({ kind: 'id', id: Number(button.dataset.id), path: item.dataset.path }, { focus: 'heading' });
  });

  // ------------------------------------------------------------------ the view: preview, grid, status, URL, title

  function showPreview(view) {
    const query = view && view.query;
    if (state.previewUrl) {
      URL.revokeObjectURL(state.previewUrl);
      state.previewUrl = null;
    }
    els.dropzone.classList.toggle('has-query', Boolean(query));
    if (!query) {
      els.preview.hidden = true;
      els.previewImage.removeAttribute('src');
      els.hint.hidden = false;
      els.choose.textContent = 'Choose an image…';
      return;
    }
    els.previewImage.onload = null;
    els.previewImage.onerror = null;
    els.previewImage.hidden = false;
    if (query.kind === 'upload') {
      state.previewUrl = URL.createObjectURL(new Blob([query.bytes], { type: query.type || '' }));
      els.previewImage.src = state.previewUrl;
      els.previewCaption.textContent = query.name;
      els.previewMeta.textContent = `your image · ${formatBytes(query.size)}`;
      els.previewImage.onload = () => {
        const { naturalWidth: w, naturalHeight: h } = els.previewImage;
        if (w && h) els.previewMeta.textContent = `your image · ${w} × ${h} · ${formatBytes(query.size)}`;
      };
      // a format the server reads and this browser does not show (HEIC in most browsers, TIFF): say so, no broken icon
      els.previewImage.onerror = () => {
        els.previewImage.hidden = true;
        els.previewMeta.textContent = `your image · ${formatBytes(query.size)} · this browser cannot show it; the search reads it`;
      };
      els.previewLinks.hidden = true;
    } else {
      const item = query.item;
      els.previewImage.src = item.thumb_url;
      els.previewCaption.textContent = item.path;
      els.previewMeta.textContent = [`database image #${item.id}`, facts(item)].filter(Boolean).join(' · ');
      els.previewOpen.href = item.image_url;
      els.previewDownload.href = item.download_url;
      els.previewLinks.hidden = false;
    }
    els.previewImage.alt = `Query: ${describe(query)}`;
    els.preview.hidden = false;
    els.hint.hidden = true;
    els.choose.textContent = 'Choose another image…';
  }

  function titleFor(view) {
    if (view && view.query) return `Similar to ${describe(view.query)} – Image search`;
    if (view && view.folder) return `${view.folder}/ – Image search`;
    return 'Image search';
  }

  function renderStatus(view, tookMs) {
    const where = view.folder ? ` in ${view.folder}/` : '';
    if (!view.query) {
      els.heading.textContent = view.folder ? `A sample of ${view.folder}/` : 'A sample of the database';
      els.status.textContent = view.total === 0
        ? `No images in the folder “${view.folder}/”.`
        : `${view.shown} of ${view.total} images${where}. Select one, or choose your own image, to search.`;
      return;
    }
    els.heading.textContent = view.folder ? `Most similar images in ${view.folder}/` : 'Most similar images';
    let text;
    if (view.shown === 0) text = view.folder ? `No images in the folder “${view.folder}/”.` : 'No results.';
    else if (view.start > 0) text = `Results ${view.start + 1}–${view.start + view.shown} of ${view.total}${where}`;
    else text = `Top ${view.shown} of ${view.total}${where}`;
    if (view.shown && typeof tookMs === 'number') text += ` · ${tookMs.toFixed(0)} ms`;
    if (view.truncated) text += ' (the folder\'s lowest-ranked images are beyond the search depth and not shown)';
    els.status.textContent = text;
  }

  function historyState(view) {
    let query = null;
    if (view.query && view.query.kind === 'upload') {
      const { name, type, size, bytes } = view.query;
      query = { kind: 'upload', name, type, size, bytes };
    } else if (view.query) {
      query = { kind: 'id', id: view.query.id, path: view.query.path };
    }
    return { app: 1, query, k: view.k, folder: view.folder, offset: view.lastOffset };
  }

  function urlFor(view) {
    const params = new URLSearchParams();
    const byId = view.query && view.query.kind === 'id';
    if (byId) params.set('id', String(view.query.id));
    if (byId || view.k !== defaultK) params.set('k', String(view.k));
    if (view.folder) params.set('folder', view.folder);
    if (byId && view.lastOffset > 0) params.set('offset', String(view.lastOffset));
    const text = params.toString();
    return text ? `?${text}` : window.location.pathname;
  }

  function writeHistory(view, mode) {
    if (mode === 'none') return;
    const method = mode === 'push' ? 'pushState' : 'replaceState';
    const entry = historyState(view);
    try {
      history[method](entry, '', urlFor(view));
    } catch (err) {  // a picture too big for this browser's history: keep the entry, without it
      if (entry.query && entry.query.kind === 'upload') entry.query = { ...entry.query, bytes: null };
      history[method](entry, '', urlFor(view));
    }
  }

  function commit(view, cards, mode, tookMs) {
    state.view = view;
    clearError();
    els.noIndex.hidden = true;
    showPreview(view);
    replaceGrid(cards);
    els.grid.classList.toggle('sample', !view.query);
    setK(view.k);
    setFolder(view.folder);
    renderStatus(view, tookMs);
    els.more.hidden = !view.hasMore;
    writeHistory(view, mode);
    document.title = titleFor(view);
  }

  // nothing to show that matches the URL (it moved on Back, or came from a link, and that failed to load)
  function showNothing(heading) {
    state.view = null;
    showPreview(null);
    replaceGrid([]);
    els.more.hidden = true;
    els.heading.textContent = heading;
    els.status.textContent = '';
    document.title = `${heading} – Image search`;
  }

  // after a new set of results: keep the query and the first results in sight together where the screen allows
  function reveal(focus) {
    if (focus === 'heading') els.heading.focus({ preventScroll: true });
    const top = (node) => node.getBoundingClientRect().top + window.scrollY;
    const first = els.grid.firstElementChild;
    const headingTop = top(els.heading);
    if (!window.matchMedia('(max-width: 760px)').matches) {
      if (headingTop < window.scrollY) window.scrollTo({ top: Math.max(0, headingTop - 16) });
      return;
    }
    const from = top(els.queryPanel) - 8;
    const to = first ? first.getBoundingClientRect().bottom + window.scrollY + 8 : headingTop + 48;
    let target = window.scrollY;
    if (to - from <= window.innerHeight) {
      if (window.scrollY > from) target = from;
      else if (window.scrollY + window.innerHeight < to) target = to - window.innerHeight;
    } else {
      target = headingTop - 8;
    }
    if (Math.abs(target - window.scrollY) > 1) window.scrollTo({ top: Math.max(0, target) });
  }

  // ------------------------------------------------------------------ requests

  function fetchResults(query, count, offset, folder) {
    if (query.kind === 'upload') {
      const form = new FormData();
      form.append('image', new Blob([query.bytes], { type: query.type || 'application/octet-stream' }), query.name || 'pasted-image');
      form.append('k', String(count));
      form.append('offset', String(offset));
      if (folder) form.append('folder', folder);
      return api('/api/search', { method: 'POST', body: form });
    }
    const params = new URLSearchParams({ id: String(query.id), k: String(count), offset: String(offset) });
    if (folder) params.set('folder', folder);
    if (state.version) params.set('v', state.version);
    return api(`/api/search?${params}`);
  }

  // a new set of results for `query`; opts: k, folder, offset (restore up to it), history (push | replace | none),
  // origin (user: an action on this page | url: a link, reload or Back/Forward), focus ('heading')
  async function search(query, opts) {
    const k = opts.k || Number(els.kSelect.value) || defaultK;
    const folder = opts.folder !== undefined ? opts.folder : (state.view ? state.view.folder : els.folderSelect.value);
    const restore = opts.offset || 0;
    let start = 0;
    let count = k;
    if (restore > 0) {
      if (restore + k <= maxK) count = restore + k;  // everything up to that page, in one request
      else start = restore;  // too deep for one request: that page alone
    }
    const seq = ++state.seq;
    setBusy(true, 'Searching…');
    try {
      const data = await fetchResults(query, count, start, folder);
      if (seq !== state.seq) return;
      setBusy(false);
      noteVersion(data.version);
      const committed = query.kind === 'id' ? { kind: 'id', id: query.id, path: data.query.path, item: data.query } : query;
      const view = {
        query: committed, k, folder, start, shown: data.results.length, total: data.total, hasMore: data.has_more,
        version: data.version, lastOffset: restore, truncated: Boolean(data.truncated),
      };
      commit(view, data.results.map((hit) => card(hit, hit)), opts.history, data.took_ms);
      if (opts.notice) showError(opts.notice);
      reveal(opts.focus);
    } catch (err) {
      if (seq !== state.seq) return;
      setBusy(false);
      await failed(err, { query, origin: opts.origin, retry: () => search(query, opts) });
    }
  }

  function searchWith(query, extra = {}) {
    if (!state.indexLoaded) {
      showError('No index is loaded yet, so there is nothing to search: build one with index.py (see above).');
      return;
    }
    search(query, { history: 'push', origin: 'user', ...extra });
  }

  async function loadMore() {
    const view = state.view;
    if (!view || !view.query || state.busy) return;
    const offset = view.start + view.shown;
    const seq = ++state.seq;
    setBusy(true, 'Loading more…');
    try {
      const data = await fetchResults(view.query, view.k, offset, view.folder);
      if (seq !== state.seq) return;
      setBusy(false);
      if (data.version !== view.version) {  // a new index: its ranks do not continue the old ones
        noteVersion(data.version);
        search(view.query, { k: view.k, folder: view.folder, history: 'replace', origin: 'user',
          notice: 'The database was updated, so the results start again from the top.' });
        return;
      }
      const cards = data.results.map((hit) => card(hit, hit));
      els.grid.append(...cards);
      Object.assign(view, { shown: view.shown + data.results.length, total: data.total, hasMore: data.has_more, lastOffset: offset });
      view.truncated = view.truncated || Boolean(data.truncated);
      renderStatus(view, data.took_ms);
      els.more.hidden = !view.hasMore;
      writeHistory(view, 'replace');
      // keyboard focus goes on to the first new result (the button it was on may be gone)
      if (cards.length) setActive(cards[0].querySelector('button.card-search'), true);
    } catch (err) {
      if (seq !== state.seq) return;
      setBusy(false);
      await failed(err, { query: view.query, origin: 'user', retry: loadMore, more: true });
    }
  }

  async function showSample(opts = {}) {
    const folder = opts.folder !== undefined ? opts.folder : (state.view ? state.view.folder : '');
    const k = opts.k || Number(els.kSelect.value) || defaultK;
    const seq = ++state.seq;
    setBusy(true, 'Loading…');
    try {
      const params = new URLSearchParams();
      if (folder) params.set('folder', folder);
      const data = await api(`/api/sample${params.toString() ? `?${params}` : ''}`);
      if (seq !== state.seq) return;
      setBusy(false);
      noteVersion(data.version);
      const view = {
        query: null, k, folder, start: 0, shown: data.items.length, total: data.total, hasMore: false,
        version: data.version, lastOffset: 0,
      };
      commit(view, data.items.map((item) => card(item, null)), opts.history || 'replace');
      if (opts.message) showError(opts.message);
    } catch (err) {
      if (seq !== state.seq) return;
      setBusy(false);
      if (err.status === 503) {
        enterNoIndex(null);
        return;
      }
      const text = `Could not load a sample of the database: ${sentence(err.message)}`;
      if (opts.origin === 'user' && state.view) {
        revertControls();
        showError(text, { label: 'Try again', run: () => showSample(opts) });
      } else {
        showNothing('Nothing loaded');
        showError(text, { label: 'Try again', run: () => showSample(opts) });
      }
    }
  }

  function revertControls() {
    const view = state.view;
    if (!view) return;
    setK(view.k);
    setFolder(view.folder);
  }

  async function failed(err, ctx) {
    const { query, origin } = ctx;
    if (err.status === 503 && err.body && err.body.index_loaded === false) {
      enterNoIndex(query ? { query, k: Number(els.kSelect.value), folder: els.folderSelect.value, offset: 0 } : null);
      return;
    }
    if (err.status === 409) {  // the database changed under this id: ids of the old version name other pictures now
      await refreshInfo();
      await showSample({
        folder: '', history: 'replace',
        message: `The database was updated, so “${describe(query)}” may now be another picture: this is a sample `
          + 'of the new version. Choose your query again.',
      });
      return;
    }
    const transient = err.status === 0 || err.status >= 500 || err.status === 408 || err.status === 429;
    const what = ctx.more ? `Could not load more results for “${describe(query)}”` : `Could not search with “${describe(query)}”`;
    const text = `${what}: ${sentence(err.message)}`;
    const retry = { label: 'Try again', run: ctx.retry };
    if (origin === 'url') {
      if (transient) {  // the URL already names this query: show nothing else under it, and offer to try again
        showNothing('Results not loaded');
        showError(text, retry);
      } else {  // a link or history entry that cannot be searched: say so, and start from a sample
        await showSample({ folder: '', history: 'replace', message: `${text} Showing a sample of the database instead.` });
      }
      return;
    }
    revertControls();  // a user action: the view stays as it was, and so do the controls that describe it
    let action = null;
    if (transient) action = retry;
    else if (query && query.kind === 'upload') action = { label: 'Choose another image…', run: openPicker };
    showError(text + stillShown(), action);
  }

  // ------------------------------------------------------------------ no index yet

  let waiting = null;
  function enterNoIndex(pending) {
    state.indexLoaded = false;
    if (pending) state.pending = pending;
    showNothing('No index loaded');
    document.title = 'No index loaded – Image search';
    clearError();
    els.noIndex.hidden = false;
    els.kSelect.disabled = true;
    els.folderSelect.disabled = true;
    setBusy(false);
    waitForIndex(2000);
  }

  // the server loads a new index file by itself; look again now and then, and start when it is there
  function waitForIndex(delay) {
    if (waiting) return;
    waiting = window.setTimeout(async () => {
      waiting = null;
      let info;
      try {
        info = await api('/api/info');
      } catch (err) {
        waitForIndex(Math.min(15000, delay * 1.5));
        return;
      }
      renderInfo(info);
      state.indexLoaded = true;
      els.kSelect.disabled = false;
      els.folderSelect.disabled = false;
      els.noIndex.hidden = true;
      setBusy(false);
      loadFolders();
      const pending = state.pending;
      state.pending = null;
      if (pending && pending.query) {
        search(pending.query, { k: pending.k, folder: pending.folder, offset: pending.offset, history: 'replace', origin: 'url' });
      } else {
        showSample({ folder: pending ? pending.folder : '', history: 'replace' });
      }
    }, delay);
  }

  // ------------------------------------------------------------------ picking, dropping, pasting

  function openPicker() {
    if (!state.indexLoaded) {
      showError('No index is loaded yet, so there is nothing to search: build one with index.py (see above).');
      return;
    }
    if (state.busy) return;
    els.fileInput.click();
  }

  async function searchFile(file) {
    if (!file) return;
    const name = file.name || 'pasted image';
    if (!state.indexLoaded) {
      openPicker();
      return;
    }
    // the same rule as the server's: a file larger than the limit is refused, one of exactly the limit is not
    if (file.size > maxUpload) {
      showError(`“${name}” is too large to search with: ${exactBytes(file.size)}, and the limit is ${exactBytes(maxUpload)}.${stillShown()}`,
        { label: 'Choose another image…', run: openPicker });
      return;
    }
    if (file.size === 0) {
      showError(`“${name}” is empty (0 bytes): there is no picture in it.${stillShown()}`,
        { label: 'Choose another image…', run: openPicker });
      return;
    }
    let bytes;
    try {
      bytes = await file.arrayBuffer();
    } catch (err) {
      showError(`“${name}” could not be read from your device.${stillShown()}`);
      return;
    }
    search({ kind: 'upload', name, type: file.type, size: file.size, bytes }, { history: 'push', origin: 'user' });
  }

  els.choose.addEventListener('click', openPicker);
  els.fileInput.addEventListener('change', () => {
    const file = els.fileInput.files && els.fileInput.files[0];
    searchFile(file);
    els.fileInput.value = '';  // choosing the same file again searches again
  });
  els.kSelect.addEventListener('change', () => {
    const k = Number(els.kSelect.value);
    const view = state.view;
    if (view && view.query) search(view.query, { k, folder: view.folder, history: 'replace', origin: 'user' });
    else if (view) {
      view.k = k;
      writeHistory(view, 'replace');
    }
  });
  els.folderSelect.addEventListener('change', () => {
    const folder = els.folderSelect.value;
    const view = state.view;
    if (view && view.query) search(view.query, { k: view.k, folder, history: 'push', origin: 'user' });
    else showSample({ folder, history: 'push', origin: 'user' });
  });
  els.more.addEventListener('click', loadMore);

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
        searchWith({ kind: 'id', id: Number(match[1]) });
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

  // ------------------------------------------------------------------ keyboard shortcuts and help

  function openHelp() {
    if (!els.help.open) els.help.showModal();
  }
  els.helpButton.addEventListener('click', openHelp);
  els.helpClose.addEventListener('click', () => els.help.close());
  els.help.addEventListener('click', (event) => { if (event.target === els.help) els.help.close(); });

  document.addEventListener('keydown', (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    if (els.help.open) return;
    const target = event.target;
    if (target instanceof Element && target.closest('input, select, textarea, [contenteditable]')) return;
    if (event.key === '/' || event.key === 'u' || event.key === 'U') {
      event.preventDefault();
      openPicker();
    } else if (event.key === '?') {
      event.preventDefault();
      openHelp();
    }
  });

  // ------------------------------------------------------------------ the URL and history

  // what the address asks for: {query, k, folder, offset, problems}; a value that is not valid is named in problems
  function fromLocation() {
    const params = new URLSearchParams(window.location.search);
    const problems = [];
    let k = defaultK;
    if (params.has('k')) {
      const raw = params.get('k');
      if (WHOLE.test(raw) && Number(raw) >= 1 && Number(raw) <= maxK) k = Number(raw);
      else problems.push(`k must be a whole number from 1 to ${maxK}, not “${raw}”`);
    }
    let offset = 0;
    if (params.has('offset')) {
      const raw = params.get('offset');
      if (WHOLE.test(raw)) offset = Number(raw);
      else problems.push(`offset must be a whole number, not “${raw}”`);
    }
    let query = null;
    if (params.has('id')) {
      const raw = params.get('id');
      if (WHOLE.test(raw)) query = { kind: 'id', id: Number(raw) };
      else problems.push(`“${raw}” is not a database id (those are whole numbers such as 12)`);
    }
    return { query, k, folder: params.get('folder') || '', offset, problems };
  }

  function fromHistory(entry) {
    if (!entry || entry.app !== 1) return null;
    return { query: entry.query, k: entry.k || defaultK, folder: entry.folder || '', offset: entry.offset || 0, problems: [] };
  }

  function go(target) {
    if (target.problems.length) {
      setK(target.k);
      showSample({ folder: '', history: 'replace',
        message: `This link cannot be used as it is: ${target.problems.join('; ')}. Showing a sample of the database instead.` });
      return;
    }
    const query = target.query;
    if (query && query.kind === 'upload' && !query.bytes) {
      showSample({ folder: target.folder, history: 'replace',
        message: `The image “${query.name}” of this page is no longer kept by the browser: choose it again.` });
      return;
    }
    if (query) search(query, { k: target.k, folder: target.folder, offset: target.offset, history: 'replace', origin: 'url' });
    else showSample({ folder: target.folder, k: target.k, history: 'replace' });
  }

  window.addEventListener('popstate', (event) => {
    if (!state.indexLoaded) return;
    go(fromHistory(event.state) || fromLocation());
  });

  // ------------------------------------------------------------------ start

  function start() {
    const target = fromHistory(history.state) || fromLocation();
    setK(target.k);
    if (!state.indexLoaded) {
      enterNoIndex(target.problems.length ? null : target);
      return;
    }
    loadFolders();
    go(target);
  }

  els.body.classList.add('js');
  start();
})();
