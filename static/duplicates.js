// The "Duplicates" view: groups of near-identical database images (GET /api/duplicates), the suggested one to keep
// first in each group. It only reports: nothing is deleted or moved. Vanilla JS; server text goes through textContent.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const toggle = $('duplicates-button');
  const panel = $('duplicates');
  if (!toggle || !panel) return;
  const searchView = [document.querySelector('.query-panel'), document.querySelector('.results-panel')].filter(Boolean);
  const form = $('duplicates-form');
  const input = $('duplicates-threshold');
  const heading = $('duplicates-heading');
  const status = $('duplicates-status');
  const error = $('duplicates-error');
  const errorText = $('duplicates-error-text');
  const list = $('duplicates-groups');
  const close = $('duplicates-close');
  let seq = 0;

  const { el, api } = window.cbir;

  function plural(n, one, many) {
    return `${n.toLocaleString()} ${n === 1 ? one : many}`;
  }

  function member(item) {
    const size = item.width && item.height ? `${item.width}×${item.height}` : 'size unknown';
    const image = el('img', { src: item.thumb_url, alt: '', loading: 'lazy', decoding: 'async', width: 120, height: 120 });
    // the link searches with the image on the main page (its URL holds the id)
    const label = `${item.keep ? 'Keep: ' : ''}${item.path}, ${item.keep ? 'suggested to keep' : `similarity ${item.score.toFixed(3)}`}. Search with this image`;
    const link = el('a', { className: 'duplicate-link', href: `?id=${item.id}`, 'aria-label': label }, [image]);
    const caption = el('p', { className: 'duplicate-caption' }, [
      item.keep ? el('span', { className: 'keep-badge', text: 'Keep' }) : el('span', { className: 'score', text: item.score.toFixed(3) }),
      el('span', { className: 'path', text: item.path }),
      el('span', { className: 'facts', text: size }),
    ]);
    return el('li', { className: item.keep ? 'duplicate keep' : 'duplicate', 'data-id': item.id, 'data-keep': item.keep ? '1' : '0' }, [link, caption]);
  }

  function render(body) {
    list.replaceChildren();
    body.groups.forEach((group, index) => {
      const id = `duplicate-group-${index + 1}`;
      const title = `Group ${index + 1}: ${plural(group.size, 'image', 'images')}, similarity ${group.min_score.toFixed(3)}–${group.max_score.toFixed(3)}`;
      const members = el('ul', { className: 'duplicate-members', 'aria-labelledby': id }, group.members.map(member));
      list.append(el('li', { className: 'duplicate-group' }, [el('h3', { id, text: title }), members]));
    });
    const shown = body.truncated ? ` (the first ${body.groups.length} shown)` : '';
    const verified = body.verified
      ? ` Each pair verified by ${body.verified} (${plural(body.rejected_by_verification, 'pair', 'pairs')} rejected).`
      : '';
    status.textContent = body.groups_count
      ? `${plural(body.groups_count, 'group', 'groups')}${shown}, ${plural(body.duplicates, 'copy', 'copies')} among ${plural(body.images, 'image', 'images')} at similarity ≥ ${body.threshold}.${verified} Nothing is deleted or moved.`
      : `No duplicates among ${plural(body.images, 'image', 'images')} at similarity ≥ ${body.threshold}.${verified}`;
  }

  async function load() {
    const mine = ++seq;
    const params = new URLSearchParams();
    const raw = input.value.trim();
    if (raw) params.set('threshold', raw);
    error.hidden = true;
    list.setAttribute('aria-busy', 'true');
    status.textContent = 'Comparing every image with the others…';
    let body;
    try {
      body = await api(`/api/duplicates?${params}`);
    } catch (err) {
      if (mine !== seq) return;
      list.removeAttribute('aria-busy');
      errorText.textContent = `Cannot find duplicates: ${err.message}.`.replace(/\.\.$/, '.');
      error.hidden = false;
      status.textContent = '';
      return;
    }
    if (mine !== seq) return;
    list.removeAttribute('aria-busy');
    input.value = String(body.threshold);
    render(body);
  }

  function open() {
    toggle.setAttribute('aria-expanded', 'true');
    panel.hidden = false;
    for (const part of searchView) part.hidden = true;
    heading.focus();
    load();
  }

  function shut() {
    toggle.setAttribute('aria-expanded', 'false');
    panel.hidden = true;
    for (const part of searchView) part.hidden = false;
    toggle.focus();
  }

  toggle.addEventListener('click', () => (panel.hidden ? open() : shut()));
  close.addEventListener('click', shut);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    load();
  });
  panel.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') {
      event.preventDefault();
      shut();
    }
  });
})();
