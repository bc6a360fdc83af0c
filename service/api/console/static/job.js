// One job: live curves from the SSE stream, event log, auto-layer sweep, auto-method table, validation
// report, cancel.
import { api, events } from './api.js';
import { h, clear, fmt, statusBadge, TERMINAL } from './dom.js';
import { lineChart, barChart } from './charts.js';

function kv(pairs) {
  return h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== '')
    .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function reportView(report) {
  if (!report) return h('p', { class: 'muted' }, 'No validation report yet.');
  const scalars = Object.entries(report).filter(([, v]) => v === null || typeof v !== 'object');
  const nested = Object.entries(report).filter(([, v]) => v !== null && typeof v === 'object');
  return h('div', { 'data-testid': 'validation-report' },
    kv(scalars.map(([k, v]) => [k.replaceAll('_', ' '), String(v)])),
    nested.map(([k, v]) => h('details', {}, h('summary', {}, `${k.replaceAll('_', ' ')} (${Array.isArray(v) ? v.length : Object.keys(v).length})`),
      h('pre', { class: 'code' }, JSON.stringify(v, null, 2)))));
}

export async function renderJob(ctx) {
  const id = ctx.params[0];
  let job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal });

  const curves = { loss: [], acc: [], trainAcc: [], valAcc: [], epochLoss: [] };
  let sweep = null;
  let candidates = [];  // rows of the `auto` method search, as its events arrive
  const log = h('ol', { class: 'log', 'data-testid': 'event-log', 'aria-live': 'polite', 'aria-label': 'Event log' });
  const header = h('div');
  const facts = h('div');
  const charts = h('div', { class: 'charts' });
  const sweepBox = h('div');
  const searchBox = h('div');
  const reportBox = h('div');
  const resultBox = h('div');

  const cancel = h('button', {
    type: 'button', class: 'danger', 'data-testid': 'cancel-job',
    onclick: async () => {
      cancel.disabled = true;
      try { job = await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: 'POST', signal: ctx.signal }); draw(); } catch (err) { ctx.showError(err); cancel.disabled = false; }
    },
  }, 'Cancel job');

  function drawHeader() {
    const p = job.progress || {};
    clear(header,
      h('p', {}, h('a', { href: '#/jobs' }, '← Jobs')),
      h('div', { class: 'row-between' },
        h('h1', {}, job.name || job.id, ' ', statusBadge(job.status)),
        TERMINAL.has(job.status) || job.status === 'cancelling' ? null : cancel),
      h('div', { class: 'row' }, h('progress', { max: 1, value: p.fraction || 0, 'aria-label': 'progress' }),
        h('span', { class: 'muted' }, ` epoch ${p.epoch || 0} of ${p.epochs || 0}`)),
      job.error ? h('div', { class: 'callout error', role: 'status' }, h('strong', {}, `${job.error.code || 'error'}: `), job.error.message || '') : null);
  }

  function drawFacts() {
    const hp = job.hyperparameters || {};
    clear(facts, h('section', { class: 'card' }, h('h2', {}, 'Job'), kv([
      ['id', h('code', {}, job.id)], ['backbone', job.backbone], ['method', job.method],
      ['method options', Object.keys(job.method_options || {}).length ? JSON.stringify(job.method_options) : null],
      ['prompt layer', fmt.layer(job)], ['prompt shape', job.prompt_shape], ['dataset', h('code', {}, job.dataset_uri)],
      ['epochs', hp.epochs], ['learning rate', hp.learning_rate], ['batch size', hp.batch_size],
      ['attempts', `${job.attempts} of ${job.max_attempts}`], ['created', fmt.time(job.created_at)],
      ['finished', job.finished_at ? fmt.time(job.finished_at) : null],
    ])));
  }

  function drawCharts() {
    clear(charts,
      lineChart({
        title: 'Loss', xLabel: 'epoch', yLabel: 'loss', testid: 'job-curve',
        series: [
          { name: 'train loss (running)', cls: 's1', points: curves.loss },
          { name: 'train loss (epoch)', cls: 's2', points: curves.epochLoss, dots: true },
        ],
      }),
      lineChart({
        title: 'Accuracy', xLabel: 'epoch', yLabel: 'accuracy', yMin: 0, yMax: 1, testid: 'job-accuracy-curve',
        series: [
          { name: 'train (running)', cls: 's1', points: curves.acc },
          { name: 'train (epoch)', cls: 's2', points: curves.trainAcc, dots: true },
          { name: 'validation', cls: 's3', points: curves.valAcc, dots: true },
        ],
      }));
  }

  function drawSweep() {
    if (!sweep || !sweep.length) { clear(sweepBox); return; }
    const chosen = job.resolved_layers && job.resolved_layers.length === 1 ? job.resolved_layers[0] : null;
    clear(sweepBox, h('section', { class: 'card' }, h('h2', {}, 'Auto layer sweep'),
      barChart({
        title: 'Validation accuracy of a short probe at each candidate layer', testid: 'layer-sweep',
        rows: sweep.map((r) => ({ label: `${r.index} ${r.name || ''}`, value: Number(r.val_accuracy) || 0, highlight: r.index === chosen })),
      })));
  }

  function drawSearch() {
    // The job's own record once it finished; the live events until then.
    const rows = (job.metrics && job.metrics.auto && job.metrics.auto.candidates) || candidates;
    if (!rows.length) { clear(searchBox); return; }
    const num = (v, digits) => (typeof v === 'number' ? v.toFixed(digits) : '—');
    clear(searchBox, h('section', { class: 'card' }, h('h2', {}, 'Auto method search'),
      h('p', { class: 'muted small' }, 'Each candidate trained on the training split; the choice is made on validation only.'),
      h('table', { class: 'table', 'data-testid': 'method-search' },
        h('thead', {}, h('tr', {}, h('th', {}, 'method'), h('th', { class: 'num' }, 'val top-1'),
          h('th', { class: 'num' }, 'trainable parameters'), h('th', { class: 'num' }, 'train s'),
          h('th', { class: 'num' }, 'serving ms / image'), h('th', {}, ''))),
        h('tbody', {}, rows.map((r) => h('tr', {
          class: r.chosen ? 'chosen' : '', 'data-testid': 'method-search-row', 'data-method': r.method, 'data-chosen': r.chosen ? 'true' : 'false',
        },
        h('td', {}, r.label || r.method), h('td', { class: 'num' }, r.val_accuracy === null || r.val_accuracy === undefined ? '—' : fmt.pct(r.val_accuracy)),
        h('td', { class: 'num' }, fmt.int(r.trainable_params)), h('td', { class: 'num' }, num(r.train_seconds, 1)),
        h('td', { class: 'num' }, num(r.serving_ms_per_image, 3)),
        h('td', {}, r.chosen ? h('span', { class: 'badge' }, '★ chosen') : (r.skipped || ''))))))));
  }

  function drawResult() {
    if (job.status !== 'succeeded') { clear(resultBox); return; }
    const m = job.metrics || {};
    clear(resultBox, h('section', { class: 'card' }, h('h2', {}, 'Result'), kv([
      ['prompt', h('code', { 'data-testid': 'job-prompt' }, job.prompt)],
      ['test top-1', m.test ? fmt.pct(m.test.top1) : null], ['test top-5', m.test ? fmt.pct(m.test.top5) : null],
      ['val top-1', m.val ? fmt.pct(m.val.top1) : null], ['train seconds', m.train_seconds ? m.train_seconds.toFixed(1) : null],
    ]), h('a', { class: 'button', href: `#/playground?a=${encodeURIComponent(job.prompt)}` }, 'Try it in the playground')));
  }

  function draw() {
    drawHeader(); drawFacts(); drawSweep(); drawSearch(); drawResult();
    clear(reportBox, h('section', { class: 'card' }, h('h2', {}, 'Validation report'), reportView(job.validation_report)));
  }

  clear(ctx.root, header, h('div', { class: 'grid2' }, h('section', { class: 'card' }, h('h2', {}, 'Curves'), charts), facts),
    sweepBox, searchBox, resultBox, reportBox, h('section', { class: 'card' }, h('h2', {}, 'Events'), log));
  draw();
  drawCharts();

  let pending = null;
  const refresh = () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try { job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal }); draw(); } catch (err) { ctx.showError(err); }
    }, 300);
  };

  const stream = events(`/v1/jobs/${encodeURIComponent(id)}/events`, { signal: ctx.signal });
  (async () => {
    for await (const ev of stream) {
      if (ev.event === 'end') break;
      const e = ev.data;
      if (!e || typeof e !== 'object' || !e.type) continue;
      const d = e.data || {};
      const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
      log.append(h('li', { class: `lvl-${e.level || 'info'}`, 'data-type': e.type },
        h('time', { datetime: e.created_at }, e.created_at ? new Date(e.created_at).toLocaleTimeString() : ''), ' ',
        h('span', { class: 'tag' }, e.type), ' ', e.message || ''));
      if (atBottom) log.scrollTop = log.scrollHeight;
      if (e.type === 'progress' && typeof d.loss === 'number') {
        const x = (d.epoch - 1) + d.step / Math.max(1, d.steps);
        curves.loss.push([x, d.loss]);
        if (typeof d.accuracy === 'number') curves.acc.push([x, d.accuracy]);
        drawCharts();
      } else if (e.type === 'epoch') {
        curves.epochLoss.push([d.epoch, d.train_loss]);
        curves.trainAcc.push([d.epoch, d.train_accuracy]);
        if (typeof d.val_accuracy === 'number') curves.valAcc.push([d.epoch, d.val_accuracy]);
        drawCharts();
        refresh();
      } else if (e.type === 'method_search') {
        candidates = [...candidates, d];
        drawSearch();
        refresh();
      } else if (e.type === 'layer_search') {
        if (Array.isArray(d.sweep)) sweep = d.sweep;
        else if (typeof d.index === 'number') sweep = [...(sweep || []), d];
        refresh();
        drawSweep();
      } else {
        refresh();
      }
    }
    refresh();
  })().catch(ctx.showError);
}
