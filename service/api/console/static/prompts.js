// Prompts: latest version of each with size and metrics; versions, download, delete.
import { api, listAll } from './api.js';
import { h, clear, fmt } from './dom.js';

async function download(ref, signal) {
  const res = await api(`/v1/prompts/${encodeURIComponent(ref)}/artifact`, { raw: true, signal });
  const url = URL.createObjectURL(await res.blob());
  const a = h('a', { href: url, download: `${ref}.safetensors` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function promptRow(p, ctx, refresh, { isVersion = false } = {}) {
  const test = p.metrics && p.metrics.test ? p.metrics.test.top1 : null;
  const versions = h('tr', { class: 'versions', hidden: true });
  const actions = h('td', {}, h('div', { class: 'actions' },
    isVersion ? null : h('button', {
      type: 'button', 'aria-expanded': 'false',
      onclick: async (e) => {
        const btn = e.currentTarget;
        const open = btn.getAttribute('aria-expanded') === 'true';
        btn.setAttribute('aria-expanded', String(!open));
        versions.hidden = open;
        if (open) return;
        try {
          const list = (await api(`/v1/prompts/${encodeURIComponent(p.id)}/versions`, { signal: ctx.signal })).data;
          clear(versions, h('td', { colspan: 8 }, h('table', { class: 'table inner' },
            h('tbody', {}, list.map((v) => promptRow(v, ctx, refresh, { isVersion: true }))))));
        } catch (err) { ctx.showError(err); }
      },
    }, `Versions (${p.version})`),
    h('button', { type: 'button', onclick: () => download(p.ref, ctx.signal).catch(ctx.showError) }, 'Download'),
    h('a', { class: 'button', href: `#/playground?a=${encodeURIComponent(p.ref)}` }, 'Playground'),
    h('button', {
      type: 'button', class: 'danger',
      onclick: async () => {
        const target = isVersion ? p.ref : p.id;
        if (!window.confirm(isVersion ? `Delete version ${p.ref}?` : `Delete ${p.id} and all its versions?`)) return;
        try { await api(`/v1/prompts/${encodeURIComponent(target)}`, { method: 'DELETE', signal: ctx.signal }); await refresh(); } catch (err) { ctx.showError(err); }
      },
    }, 'Delete')));
  const tr = h('tr', { 'data-testid': 'prompt-row', 'data-ref': p.ref },
    h('td', {}, h('code', {}, p.ref), p.name ? h('div', { class: 'small muted' }, p.name) : null),
    h('td', {}, p.backbone), h('td', {}, p.method === 'activation' ? (p.prompt_layer || []).join(', ') : p.method),
    h('td', { class: 'num' }, fmt.bytes(p.size_bytes)), h('td', { class: 'num' }, String((p.classes || []).length)),
    h('td', { class: 'num' }, fmt.pct(test)), h('td', { class: 'small' }, fmt.time(p.created_at)), actions);
  return isVersion ? tr : [tr, versions];
}

export async function renderPrompts(ctx) {
  const tbody = h('tbody');
  async function refresh() {
    const list = await listAll('/v1/prompts', { signal: ctx.signal });
    clear(tbody, list.length ? list.map((p) => promptRow(p, ctx, refresh))
      : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No prompts yet: a job that succeeds stores one.')));
  }
  clear(ctx.root, h('h1', {}, 'Prompts'),
    h('table', { class: 'table' },
      h('thead', {}, h('tr', {}, ['Prompt', 'Backbone', 'Layer', 'Size', 'Classes', 'Test acc.', 'Created', ''].map((t) => h('th', { scope: 'col' }, t)))),
      tbody));
  await refresh();
}
