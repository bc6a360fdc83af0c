// The console shell: sign-in, navigation (hash routes), one error banner, and view lifecycles.
import { api, auth, ApiError } from './api.js';
import { h, clear } from './dom.js';
import { renderJobs } from './jobs.js';
import { renderJob } from './job.js';
import { renderNewJob } from './newjob.js';
import { renderPrompts } from './prompts.js';
import { renderPlayground } from './playground.js';
import { renderAdmin } from './admin.js';

const view = document.getElementById('view');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const banner = document.getElementById('banner');

/** Show an error as the API's message (or the exception's), never a blank page. */
export function showError(err) {
  if (err && err.name === 'AbortError') return;
  const msg = err instanceof ApiError ? err.message : (err && err.message) || String(err);
  const code = err instanceof ApiError && err.code ? ` (${err.status ? `${err.status} ` : ''}${err.code})` : '';
  clear(banner, h('strong', {}, 'Error: '), h('span', { 'data-testid': 'error-message' }, msg), h('span', { class: 'muted' }, code),
    h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss the error', onclick: () => { banner.hidden = true; } }, '×'));
  banner.hidden = false;
}

export function clearError() { banner.hidden = true; }

window.addEventListener('error', (e) => showError(e.error || e.message));
window.addEventListener('unhandledrejection', (e) => showError(e.reason));

const TENANT_ROUTES = [
  ['#/jobs', 'Jobs'], ['#/new', 'New job'], ['#/prompts', 'Prompts'], ['#/playground', 'Playground'],
];
const ADMIN_ROUTES = [['#/admin', 'Admin']];

function renderNav() {
  const role = auth.role;
  const routes = role === 'admin' ? ADMIN_ROUTES : TENANT_ROUTES;
  const current = location.hash.split('?')[0] || '';
  clear(nav, h('ul', {}, routes.map(([href, label]) => h('li', {}, h('a', {
    href, 'aria-current': current.startsWith(href) ? 'page' : null,
  }, label)))));
  nav.hidden = !role;
  clear(who, role ? [h('span', { class: 'muted' }, role === 'admin' ? 'admin key' : 'tenant key'), ' ',
    h('button', { type: 'button', 'data-testid': 'sign-out', onclick: signOut }, 'Sign out')] : []);
}

function signOut() {
  auth.clear();
  location.hash = '#/signin';
  route();
}

function signIn(ctx) {
  const input = h('input', {
    id: 'api-key', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true,
    'data-testid': 'api-key-input', 'aria-describedby': 'api-key-help',
  });
  const button = h('button', { type: 'submit', class: 'primary', 'data-testid': 'sign-in' }, 'Sign in');
  const form = h('form', {
    class: 'card narrow', 'aria-labelledby': 'signin-title',
    onsubmit: async (e) => {
      e.preventDefault();
      clearError();
      const key = input.value.trim();
      if (!key) { input.focus(); return; }
      button.disabled = true;
      try {
        try {
          await api('/v1/backbones?limit=1', { key }); // any valid key: 401 shows the API's message
        } catch (err) { // a key without the `read` scope is still a key: its pages show the API's 403
          if (!(err instanceof ApiError && err.code === 'insufficient_scope')) throw err;
        }
        let role = 'tenant';
        try {
          await api('/v1/tenants?limit=1', { key });
          role = 'admin';
        } catch (err) {
          if (!(err instanceof ApiError && err.status === 403)) throw err;
        }
        auth.set(key, role);
        location.hash = role === 'admin' ? '#/admin' : '#/jobs';
        route();
      } catch (err) {
        showError(err);
        input.setAttribute('aria-invalid', 'true');
        input.focus();
      } finally {
        button.disabled = false;
      }
    },
  },
  h('h1', { id: 'signin-title' }, 'Sign in'),
  h('label', { for: 'api-key' }, 'API key'),
  input,
  h('p', { id: 'api-key-help', class: 'muted' },
    'A tenant key (jobs, prompts, playground) or the admin key (tenants, keys, backbones). ',
    'It stays in this browser tab only (sessionStorage) and is sent to this server’s public API.'),
  button);
  clear(ctx.root, form);
  input.focus();
}

const ROUTES = [
  [/^#\/jobs\/([^/?]+)$/, renderJob],
  [/^#\/jobs$/, renderJobs],
  [/^#\/new$/, renderNewJob],
  [/^#\/prompts$/, renderPrompts],
  [/^#\/playground$/, renderPlayground],
  [/^#\/admin$/, renderAdmin],
];

let controller = null;

async function route() {
  if (controller) controller.abort();
  controller = new AbortController();
  const [path, qs] = (location.hash || '').split('?');
  const ctx = { root: view, signal: controller.signal, query: new URLSearchParams(qs || ''), params: [], showError };
  clearError();
  renderNav();
  if (!auth.key) { signIn(ctx); return; }
  const fallback = auth.role === 'admin' ? '#/admin' : '#/jobs';
  const match = ROUTES.find(([re]) => re.test(path));
  if (!match) { location.replace(fallback); return; }
  ctx.params = path.match(match[0]).slice(1).map(decodeURIComponent);
  clear(view, h('p', { class: 'muted' }, 'Loading…'));
  try {
    await match[1](ctx);
  } catch (err) {
    if (err && err.name === 'AbortError') return;
    showError(err);
    if (view.textContent.trim() === 'Loading…') clear(view, h('p', { class: 'muted' }, 'This page could not be loaded: see the error above. ', h('a', { href: fallback }, 'Back')));
  }
  view.focus({ preventScroll: true });
}

window.addEventListener('hashchange', route);
route();
