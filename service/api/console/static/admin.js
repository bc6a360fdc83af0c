// Admin (with the admin key): tenants and their keys, backbones.
import { api, listAll } from './api.js';
import { h, clear, fmt } from './dom.js';

function secret(title, value) {
  return h('div', { class: 'callout', role: 'status', 'data-testid': 'new-secret' },
    h('strong', {}, title), ' — shown only once, copy it now: ', h('code', { class: 'secret' }, value));
}

const SCOPES = ['predict', 'read', 'train', 'admin'];

async function keysPanel(tenant, ctx, box) {
  const list = (await api(`/v1/tenants/${encodeURIComponent(tenant.id)}/keys`, { signal: ctx.signal })).data;
  const reload = () => keysPanel(tenant, ctx, box).catch(ctx.showError);
  const boxes = SCOPES.map((s) => h('input', { type: 'checkbox', id: `scope-${tenant.id}-${s}`, value: s, checked: true, 'data-testid': `scope-${s}` }));
  clear(box, h('td', { colspan: 4 },
    h('table', { class: 'table inner' },
      h('thead', {}, h('tr', {}, ['Key', 'Name', 'Scopes', 'Created', 'Revoked', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, list.map((k) => h('tr', { 'data-testid': 'key-row' },
        h('td', {}, h('code', {}, `${k.prefix}…`), h('div', { class: 'small muted' }, k.id)), h('td', {}, k.name || ''),
        h('td', { class: 'small' }, (k.scopes || []).join(', ')),
        h('td', { class: 'small' }, fmt.time(k.created_at)), h('td', { class: 'small' }, k.revoked_at ? fmt.time(k.revoked_at) : ''),
        h('td', {}, k.revoked_at ? null : h('button', {
          type: 'button', class: 'danger',
          onclick: async () => {
            if (!window.confirm(`Revoke key ${k.prefix}…?`)) return;
            try { await api(`/v1/keys/${encodeURIComponent(k.id)}`, { method: 'DELETE', signal: ctx.signal }); await reload(); } catch (err) { ctx.showError(err); }
          },
        }, 'Revoke')))))),
    h('fieldset', { class: 'inline' }, h('legend', {}, 'Scopes of a new key'),
      ...SCOPES.map((s, i) => h('label', { for: boxes[i].id }, boxes[i], ` ${s} `))),
    h('button', {
      type: 'button',
      onclick: async () => {
        try {
          const scopes = boxes.filter((b) => b.checked).map((b) => b.value);
          const k = await api(`/v1/tenants/${encodeURIComponent(tenant.id)}/keys`, { method: 'POST', json: { scopes }, signal: ctx.signal });
          await keysPanel(tenant, ctx, box);
          box.firstChild.prepend(secret(`New key for ${tenant.name}`, k.api_key));
        } catch (err) { ctx.showError(err); }
      },
    }, 'New key')));
  box.hidden = false;
}

export async function renderAdmin(ctx) {
  const tenantsBody = h('tbody');
  const backbonesBody = h('tbody');
  const notice = h('div');

  async function loadTenants() {
    const tenants = await listAll('/v1/tenants', { signal: ctx.signal });
    clear(tenantsBody, tenants.map((t) => {
      const keys = h('tr', { hidden: true });
      return [h('tr', { 'data-testid': 'tenant-row' },
        h('td', {}, t.name), h('td', {}, h('code', {}, t.id)), h('td', { class: 'small' }, fmt.time(t.created_at)),
        h('td', {}, h('button', { type: 'button', onclick: () => (keys.hidden ? keysPanel(t, ctx, keys).catch(ctx.showError) : (keys.hidden = true)) }, 'Keys'))), keys];
    }));
  }

  async function loadBackbones() {
    const list = (await api('/v1/backbones', { signal: ctx.signal })).data;
    clear(backbonesBody, list.map((b) => h('tr', { 'data-testid': 'backbone-row' },
      h('td', {}, h('code', {}, b.id)), h('td', {}, b.model), h('td', {}, b.family), h('td', { class: 'num' }, String(b.num_layers)),
      h('td', { class: 'num' }, String(b.recommended_layer)), h('td', { class: 'small' }, b.weights),
      h('td', {}, h('button', {
        type: 'button', class: 'danger',
        onclick: async () => {
          if (!window.confirm(`Delete backbone ${b.id}?`)) return;
          try { await api(`/v1/backbones/${encodeURIComponent(b.id)}`, { method: 'DELETE', signal: ctx.signal }); await loadBackbones(); } catch (err) { ctx.showError(err); }
        },
      }, 'Delete')))));
  }

  const tName = h('input', { id: 'tenant-name', required: true, maxlength: 200 });
  const tenantForm = h('form', {
    class: 'row', onsubmit: async (e) => {
      e.preventDefault();
      try {
        const t = await api('/v1/tenants', { method: 'POST', json: { name: tName.value.trim() }, signal: ctx.signal });
        clear(notice, secret(`API key of ${t.name}`, t.api_key));
        tName.value = '';
        await loadTenants();
      } catch (err) { ctx.showError(err); }
    },
  }, h('label', { for: 'tenant-name' }, 'New tenant'), tName, h('button', { type: 'submit' }, 'Create'));

  const bId = h('input', { id: 'bb-id', required: true, placeholder: 'resnet20' });
  const bModel = h('input', { id: 'bb-model', required: true, placeholder: 'resnet20_cifar or resnet18.a1_in1k' });
  const bWeights = h('input', { id: 'bb-weights', required: true, value: 'hub', placeholder: 'hub | random | file:///…' });
  const bbForm = h('form', {
    class: 'row wrap', onsubmit: async (e) => {
      e.preventDefault();
      const btn = e.submitter;
      if (btn) { btn.disabled = true; btn.textContent = 'Registering…'; }
      try {
        await api('/v1/backbones', { method: 'POST', json: { id: bId.value.trim(), model: bModel.value.trim(), weights: bWeights.value.trim() }, signal: ctx.signal });
        bId.value = ''; bModel.value = '';
        await loadBackbones();
      } catch (err) { ctx.showError(err); } finally { if (btn) { btn.disabled = false; btn.textContent = 'Register'; } }
    },
  }, h('div', { class: 'field' }, h('label', { for: 'bb-id' }, 'Id'), bId), h('div', { class: 'field' }, h('label', { for: 'bb-model' }, 'timm model'), bModel),
  h('div', { class: 'field' }, h('label', { for: 'bb-weights' }, 'Weights'), bWeights), h('button', { type: 'submit' }, 'Register'));

  clear(ctx.root, h('h1', {}, 'Admin'), notice,
    h('section', { class: 'card' }, h('h2', {}, 'Tenants'), tenantForm,
      h('table', { class: 'table' }, h('thead', {}, h('tr', {}, ['Name', 'Id', 'Created', ''].map((t) => h('th', { scope: 'col' }, t)))), tenantsBody)),
    h('section', { class: 'card' }, h('h2', {}, 'Backbones'), bbForm,
      h('table', { class: 'table' }, h('thead', {}, h('tr', {}, ['Id', 'Model', 'Family', 'Layers', 'Recommended', 'Weights', ''].map((t) => h('th', { scope: 'col' }, t)))), backbonesBody)));
  await Promise.all([loadTenants(), loadBackbones()]);
}
