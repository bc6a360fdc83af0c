// New job: dataset (upload through the Files API, or a URI), backbone, method (every servable one the
// API lists, and `auto`) with its options, the prompt layer from a picture of the backbone's layer
// catalog (or `auto`), epochs and learning rate.
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

/** What each method takes besides the dataset and hyperparameters; a method the API lists that is
 * missing here is still offered, with no options. */
const METHODS = {
  activation: { about: 'activation prompt at one layer (or several)', layer: true, shape: true },
  deep_activation_norm: { about: 'a prompt at every block output + norm-tune', shape: true },
  lora: { about: 'low-rank updates of the convolutions / attention linears', options: ['lora_rank'] },
  input: { about: 'visual prompt on the input image', options: ['input_variant', 'pad_size'] },
  norm: { about: 'norm-tune: the norm layers\' scale and shift' },
  linear: { about: 'linear probe: the head only' },
  auto: {
    about: 'train activation (auto layer), deep_activation_norm and lora; keep the best on validation',
    options: ['prefer', 'max_train_seconds'],
  },
};

/** The methods a job may ask for, read from the API's own schema (the registry's servable ones + auto). */
async function jobMethods(signal) {
  const spec = await api('/openapi.json', { signal });
  const enumOf = spec.components.schemas.JobCreate.properties.method.enum;
  return Array.isArray(enumOf) && enumOf.length ? enumOf : ['activation'];
}

export async function renderNewJob(ctx) {
  const [backbones, methods] = await Promise.all([
    api('/v1/backbones', { signal: ctx.signal }).then((r) => r.data), jobMethods(ctx.signal)]);
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
  const methodSelect = h('select', { id: 'method', name: 'method', 'data-testid': 'method-select', 'aria-describedby': 'method-help' },
    methods.map((m) => h('option', { value: m, selected: m === 'activation' }, m)));
  // One input per method option; `option` names the API's method_options key (blank = the default).
  const optionInputs = {
    lora_rank: h('input', { id: 'opt-lora-rank', type: 'number', min: 1, max: 256, step: 1, value: 4, 'data-testid': 'option-lora_rank', 'data-option': 'lora_rank' }),
    input_variant: h('select', { id: 'opt-input-variant', 'data-testid': 'option-input_variant', 'data-option': 'input_variant' },
      h('option', { value: 'pad' }, 'pad (learn a frame)'), h('option', { value: 'additive' }, 'additive (full-image delta)')),
    pad_size: h('input', { id: 'opt-pad-size', type: 'number', min: 1, max: 64, step: 1, placeholder: 'default', 'data-testid': 'option-pad_size', 'data-option': 'pad_size' }),
    prefer: h('select', { id: 'opt-prefer', 'data-testid': 'option-prefer', 'data-option': 'prefer' },
      h('option', { value: 'accuracy' }, 'accuracy (best validation top-1)'), h('option', { value: 'cost' }, 'cost (cheapest serving within 1 point)')),
    max_train_seconds: h('input', { id: 'opt-max-train-seconds', type: 'number', min: 1, step: 'any', placeholder: 'no limit', 'data-testid': 'option-max_train_seconds', 'data-option': 'max_train_seconds' }),
  };
  const optionLabels = {
    lora_rank: 'LoRA rank', input_variant: 'VP variant', pad_size: 'Pad size (px)',
    prefer: 'Prefer', max_train_seconds: 'Training budget (s, whole search)',
  };
  const methodHelp = h('p', { class: 'muted small', id: 'method-help' });
  const optionBox = h('div', { class: 'row wrap', 'data-testid': 'method-options' });
  const shapeField = h('div');
  function methodInfo() { return METHODS[methodSelect.value] || { about: '' }; }
  function drawMethod() {
    const info = methodInfo();
    methodHelp.textContent = info.about + (methodSelect.value === 'auto' ? ' (each candidate uses its own learning rate).' : '');
    layerBox.hidden = !info.layer;
    shapeField.hidden = !info.shape;
    clear(optionBox, (info.options || []).map((o) => field(optionInputs[o].id, optionLabels[o], optionInputs[o])));
  }
  methodSelect.addEventListener('change', drawMethod);
  function methodOptions() {
    const out = {};
    for (const o of methodInfo().options || []) {
      const el = optionInputs[o];
      const v = el.value.trim();
      if (v === '') continue;
      out[o] = el.type === 'number' ? Number(v) : v;
    }
    return out;
  }
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
    const target = { method: methodSelect, ...Object.fromEntries(Object.entries(optionInputs)), dataset_uri: uriInput, 'hyperparameters.epochs': epochs, 'hyperparameters.learning_rate': lr, prompt_layer: layerBox.querySelector('input:checked'), backbone: bbSelect, file: fileInput }[err.param];
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
        const info = methodInfo();
        const body = {
          backbone: bbSelect.value,
          dataset_uri: uri,
          method: methodSelect.value,
          hyperparameters: { epochs: Number(epochs.value), learning_rate: Number(lr.value) },
        };
        if (info.layer) body.prompt_layer = layer === null || layer === 'auto' ? (layer || undefined) : Number(layer);
        if (info.shape) body.prompt_shape = shape.value;
        const options = methodOptions();
        if (Object.keys(options).length) body.method_options = options;
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
  h('div', { class: 'field' }, h('label', { for: 'method' }, 'Method'), methodSelect, methodHelp),
  optionBox,
  layerBox,
  h('div', { class: 'row wrap' },
    field('epochs', 'Epochs', epochs), field('learning-rate', 'Learning rate', lr), shapeField, field('job-name', 'Name (optional)', name)),
  formError,
  submit);

  clear(ctx.root, h('p', {}, h('a', { href: '#/jobs' }, '← Jobs')), h('h1', {}, 'New training job'),
    backbones.length ? form : h('p', { class: 'callout' }, 'No backbone is registered yet: an admin registers one (Admin → Backbones).'));
  clear(shapeField, field('prompt-shape', 'Prompt shape', shape));
  drawMethod();
  if (backbones.length) await loadCatalog();
}
