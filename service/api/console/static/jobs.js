// Jobs list: status, backbone, layer, progress, test accuracy; refreshed every 2 s while shown.
import { api } from './api.js';
import { h, clear, fmt, statusBadge, TERMINAL } from './dom.js';
import { JOB_STATES } from './states.js';

const FILTERS = ['', ...JOB_STATES];

function row(job) {
  const p = job.progress || {};
  const test = job.metrics && job.metrics.test ? job.metrics.test.top1 : null;
  return h('tr', { 'data-testid': 'job-row', 'data-job-id': job.id },
    h('td', {}, h('a', { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id),
      job.name ? h('div', { class: 'muted small' }, job.id) : null),
    h('td', {}, statusBadge(job.status)),
    h('td', {}, job.backbone),
    h('td', {}, job.method === 'activation' ? fmt.layer(job) : job.method),
    h('td', {}, h('progress', { max: 1, value: p.fraction || 0, 'aria-label': `progress of ${job.id}` }),
      h('span', { class: 'small muted' }, ` ${p.epoch || 0}/${p.epochs || 0}`)),
    h('td', { class: 'num', 'data-testid': 'job-test-accuracy' }, fmt.pct(test)),
    h('td', { class: 'small' }, fmt.time(job.created_at)));
}

export async function renderJobs(ctx) {
  const status = ctx.query.get('status') || '';
  const select = h('select', {
    id: 'job-filter',
    onchange: () => { location.hash = select.value ? `#/jobs?status=${select.value}` : '#/jobs'; },
  }, FILTERS.map((f) => h('option', { value: f, selected: f === status }, f || 'all')));
  const tbody = h('tbody');
  const more = h('p', { class: 'muted small' });
  clear(ctx.root,
    h('div', { class: 'row-between' },
      h('h1', {}, 'Jobs'),
      h('div', { class: 'row' }, h('label', { for: 'job-filter' }, 'Status '), select,
        h('a', { class: 'button primary', href: '#/new', 'data-testid': 'new-job' }, 'New job'))),
    h('table', { class: 'table', 'aria-live': 'polite' },
      h('thead', {}, h('tr', {}, ['Job', 'Status', 'Backbone', 'Layer', 'Progress', 'Test acc.', 'Created'].map((t) => h('th', { scope: 'col' }, t)))),
      tbody),
    more);

  async function refresh() {
    const page = await api(`/v1/jobs?limit=50${status ? `&status=${status}` : ''}`, { signal: ctx.signal });
    clear(tbody, page.data.length ? page.data.map(row)
      : h('tr', {}, h('td', { colspan: 7, class: 'muted', 'data-testid': 'jobs-empty' }, 'No jobs yet. ', h('a', { href: '#/new' }, 'Start one.'))));
    more.textContent = page.has_more ? 'Showing the 50 newest jobs.' : '';
    return page.data.some((j) => !TERMINAL.has(j.status));
  }

  await refresh();
  // Live: poll while the page is shown (a list has no single event stream); stops on navigation.
  const timer = setInterval(() => { refresh().catch(ctx.showError); }, 2000);
  ctx.signal.addEventListener('abort', () => clearInterval(timer));
}
