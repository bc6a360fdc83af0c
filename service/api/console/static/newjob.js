// New job: dataset (upload through the Files API, or a URI), backbone, prompt layer from a picture of
// the backbone's layer catalog (or `auto`), epochs and learning rate.
import { api, upload, ApiError } from './api.js';
import { h, clear, fmt } from './dom.js';

/** channels and spatial side of a layer's activation, for the picture ([C,H,W] or [tokens, dim]). */
function geometry(shape) {
  if (!Array.isArray(shape) || !shape.length) return { c: 1, side: 1 };
  if (shape.length >= 3) return { c: shape[0], side: shape[shape.length - 1] };
  if (shape.length === 2) return { c: shape[1], side: Math.sqrt(shape[0]) };
  return { c: shape[0], side: 1 };
}

function layerPicker(backbone, onPick) {
  const layers = backbone.layers || [];
  const maxSide = Math.max(1, ...layers.map((l) => geometry(l.shape).side));
  const maxC = Math.max(2, ...layers.map((l) => geometry(l.shape).c));
  const option = (value, title, sub, block, recommended, checked) => {
    const input = h('input', { type: 'radio', name: 'prompt_layer', value, checked, 'aria-describedby': `layer-sub-${value}` });
    input.addEventListener('change', () => onPick(value));
    return h('label', { class: `layer ${recommended ? 'recommended' : ''}`, 'data-testid': 'layer-option', 'data-value': value },
      input, h('span', { class: 'pic' }, block), h('span', { class: 'layer-title' }, title),
      h('span', { class: 'layer-sub', id: `layer-sub-${value}` }, sub),
      recommended ? h('span', { class: 'badge' }, '★ recommended') : null);
  };
  const autoBlock = h('span', { class: 'block auto', 'aria-hidden': 'true' }, '?');
  const opts = [option('auto', 'auto', 'probe candidate layers, keep the best', autoBlock, false, false)];
  for (const l of layers) {
    const g = geometry(l.shape);
    const block = h('span', { class: 'block', 'aria-hidden': 'true' });
    // Height ~ spatial size, width ~ log(channels): the picture of how the network narrows and deepens.
    block.style.height = `${Math.round(16 + 64 * (g.side / maxSide))}px`;
    block.style.width = `${Math.round(10 + 30 * (Math.log2(g.c) / Math.log2(maxC)))}px`;
    opts.push(option(String(l.index), `${l.index} ${l.name}`,
      `${fmt.shape(l.shape)} · prompt ${fmt.int(l.full_params)} (full) / ${fmt.int(l.channel_params)} (channel)`,
      block, l.recommended, l.recommended));
  }
  return h('fieldset', { class: 'layers' },
    h('legend', {}, `Prompt layer — ${backbone.id} (${backbone.model}), ${layers.length} layers; input on the left, deepest on the right`),
    h('div', { class: 'layer-strip' }, opts));
}

export async function renderNewJob(ctx) {
  const backbones = (await api('/v1/backbones', { signal: ctx.signal })).data;
  let layer = null;
  const field = (id, label, input, help) => h('div', { class: 'field' }, h('label', { for: id }, label), input, help ? h('p', { class: 'muted small', id: `${id}-help` }, help) : null);

  const bbSelect = h('select', { id: 'backbone', name: 'backbone', required: true, 'data-testid': 'backbone-select' },
    backbones.map((b) => h('option', { value: b.id }, `${b.id} — ${b.model}`)));
  const layerBox = h('div', { class: 'layer-box' });
  const fileInput = h('input', { id: 'dataset-file', type: 'file', 'data-testid': 'dataset-file', accept: '.zip,.tar,.tgz,.gz,.npz,.csv,.jsonl', 'aria-describedby': 'dataset-file-help' });
  const uriInput = h('input', { id: 'dataset-uri', type: 'text', name: 'dataset_uri', placeholder: 'file:///data/my_dataset.npz, https://…, or file_…', 'data-testid': 'dataset-uri', 'aria-describedby': 'dataset-uri-help' });
  const uploadBar = h('progress', { max: 1, value: 0, 'data-testid': 'upload-progress', 'aria-label': 'upload progress', hidden: true });
  const uploadText = h('span', { class: 'muted small', 'aria-live': 'polite' });
  const epochs = h('input', { id: 'epochs', type: 'number', min: 1, max: 1000, step: 1, value: 5, required: true, 'data-testid': 'epochs' });
  const lr = h('input', { id: 'learning-rate', type: 'number', min: 0.00001, max: 10, step: 'any', value: 0.01, required: true, 'data-testid': 'learning-rate' });
  const shape = h('select', { id: 'prompt-shape' }, h('option', { value: 'full' }, 'full (one value per activation)'), h('option', { value: 'channel' }, 'channel (one value per channel)'));
  const name = h('input', { id: 'job-name', type: 'text', maxlength: 200 });
  const submit = h('button', { type: 'submit', class: 'primary', 'data-testid': 'submit-job' }, 'Start training');
  const formError = h('div', { class: 'callout error', role: 'alert', hidden: true, 'data-testid': 'form-error' });

  async function loadCatalog() {
    clear(layerBox, h('p', { class: 'muted' }, 'Loading the layer catalog…'));
    const b = await api(`/v1/backbones/${encodeURIComponent(bbSelect.value)}`, { signal: ctx.signal });
    const rec = (b.layers || []).find((l) => l.recommended);
    layer = rec ? String(rec.index) : 'auto';
    clear(layerBox, layerPicker(b, (v) => { layer = v; }));
  }
  bbSelect.addEventListener('change', () => loadCatalog().catch(ctx.showError));

  function fail(err) {
    const msg = err instanceof ApiError ? err.message : String(err.message || err);
    clear(formError, h('strong', {}, 'The job was not created: '), h('span', { 'data-testid': 'error-message' }, msg));
    formError.hidden = false;
    const target = { dataset_uri: uriInput, 'hyperparameters.epochs': epochs, 'hyperparameters.learning_rate': lr, prompt_layer: layerBox.querySelector('input:checked'), backbone: bbSelect, file: fileInput }[err.param];
    if (target) { target.setAttribute('aria-invalid', 'true'); target.focus(); }
  }

  const form = h('form', {
    class: 'card', novalidate: false,
    onsubmit: async (e) => {
      e.preventDefault();
      formError.hidden = true;
      ctx.root.querySelectorAll('[aria-invalid]').forEach((el) => el.removeAttribute('aria-invalid'));
      submit.disabled = true;
      try {
        let uri = uriInput.value.trim();
        const file = fileInput.files[0];
        if (file) {
          uploadBar.hidden = false;
          const f = await upload('/v1/files', file, (done, total) => {
            uploadBar.value = total ? done / total : 0;
            uploadText.textContent = ` ${fmt.bytes(done)} of ${fmt.bytes(total)}`;
          }, { signal: ctx.signal });
          uploadText.textContent = ` uploaded ${f.filename || file.name} as ${f.id} (${fmt.bytes(f.bytes)})`;
          uri = f.id;
        }
        if (!uri) throw new ApiError(0, 'missing_field', 'Choose a dataset file to upload or give a dataset URI.', 'dataset_uri');
        const body = {
          backbone: bbSelect.value,
          dataset_uri: uri,
          prompt_layer: layer === null || layer === 'auto' ? (layer || undefined) : Number(layer),
          prompt_shape: shape.value,
          hyperparameters: { epochs: Number(epochs.value), learning_rate: Number(lr.value) },
        };
        if (name.value.trim()) body.name = name.value.trim();
        const job = await api('/v1/jobs', { method: 'POST', json: body, headers: { 'Idempotency-Key': crypto.randomUUID() }, signal: ctx.signal });
        location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
      } catch (err) {
        if (err.name === 'AbortError') return;
        fail(err);
      } finally {
        submit.disabled = false;
      }
    },
  },
  h('fieldset', {}, h('legend', {}, 'Dataset'),
    field('dataset-file', 'Upload a file (.zip, .tar, .npz, .csv, .jsonl)', fileInput, 'Sent through the Files API; the job reads the stored file.'),
    h('div', { class: 'row' }, uploadBar, uploadText),
    field('dataset-uri', '… or a dataset URI', uriInput, 'file:// under the server’s data roots, https://, or an uploaded file id.')),
  field('backbone', 'Backbone', bbSelect),
  layerBox,
  h('div', { class: 'row wrap' },
    field('epochs', 'Epochs', epochs), field('learning-rate', 'Learning rate', lr), field('prompt-shape', 'Prompt shape', shape), field('job-name', 'Name (optional)', name)),
  formError,
  submit);

  clear(ctx.root, h('p', {}, h('a', { href: '#/jobs' }, '← Jobs')), h('h1', {}, 'New training job'),
    backbones.length ? form : h('p', { class: 'callout' }, 'No backbone is registered yet: an admin registers one (Admin → Backbones).'));
  if (backbones.length) await loadCatalog();
}
