// Playground: drop or pick images, see top-k labels with probability bars; switch between two prompts on
// the same images (each prompt's answers are kept, so switching back is instant).
import { api, listAll } from './api.js';
import { h, clear } from './dom.js';

const CHUNK = 32; // images per request, under the server's per-request limit

export async function renderPlayground(ctx) {
  const prompts = await listAll('/v1/prompts', { signal: ctx.signal });
  const refs = [];
  for (const p of prompts) for (let v = p.version; v >= 1; v--) refs.push({ ref: `${p.id}@${v}`, label: `${p.name ? `${p.name} — ` : ''}${p.id}@${v}${v === p.version ? ' (latest)' : ''}` });
  const images = []; // {file, url}
  const results = new Map(); // ref -> [predictions per image]
  let active = 'a';

  const pick = (id, initial) => h('select', { id, 'data-testid': `playground-prompt-${id.slice(-1)}` },
    h('option', { value: '' }, '—'), refs.map((r) => h('option', { value: r.ref, selected: r.ref === initial }, r.label)));
  const selA = pick('prompt-a', ctx.query.get('a') || (refs[0] && refs[0].ref));
  const selB = pick('prompt-b', ctx.query.get('b') || '');
  const topk = h('select', { id: 'top-k' }, [1, 3, 5, 10].map((k) => h('option', { value: k, selected: k === 5 }, String(k))));
  const btnA = h('button', { type: 'button', 'aria-pressed': 'true', 'data-testid': 'show-a', onclick: () => show('a') }, 'Show A');
  const btnB = h('button', { type: 'button', 'aria-pressed': 'false', 'data-testid': 'show-b', onclick: () => show('b') }, 'Show B');
  const fileInput = h('input', { id: 'playground-files', type: 'file', accept: 'image/*', multiple: true, 'data-testid': 'playground-image', class: 'visually-hidden' });
  const drop = h('label', { for: 'playground-files', class: 'drop', tabindex: 0 },
    h('strong', {}, 'Drop images here'), ' or press Enter / click to pick files');
  const grid = h('div', { class: 'cards', 'aria-live': 'polite', 'data-testid': 'playground-results' });
  const status = h('p', { class: 'muted small', role: 'status' });

  const currentRef = () => (active === 'a' ? selA.value : selB.value);

  function show(which) {
    active = which;
    btnA.setAttribute('aria-pressed', String(which === 'a'));
    btnB.setAttribute('aria-pressed', String(which === 'b'));
    update().catch(ctx.showError);
  }

  function draw() {
    const ref = currentRef();
    const preds = results.get(`${ref}|${topk.value}`);
    clear(grid, images.map((img, i) => h('figure', { class: 'card pred', 'data-testid': 'prediction-card' },
      h('img', { src: img.url, alt: img.file.name, width: 96, height: 96 }),
      h('figcaption', {}, h('div', { class: 'small muted' }, img.file.name, preds ? ` · ${ref}` : ''),
        preds ? h('ol', { class: 'preds' }, preds[i].map((p) => h('li', { 'data-testid': 'prediction-row', 'data-label': p.label, 'data-index': p.index },
          h('span', { class: 'plabel' }, p.label),
          h('progress', { max: 1, value: p.probability, 'aria-label': `${p.label} probability` }),
          h('span', { class: 'num' }, `${(100 * p.probability).toFixed(1)} %`))))
          : h('p', { class: 'muted' }, ref ? 'Predicting…' : 'Pick a prompt.')))));
  }

  async function update() {
    draw();
    const ref = currentRef();
    const key = `${ref}|${topk.value}`;
    if (!ref || !images.length || results.has(key)) return;
    status.textContent = `Predicting ${images.length} image(s) with ${ref}…`;
    const out = [];
    for (let i = 0; i < images.length; i += CHUNK) {
      const form = new FormData();
      form.append('prompt', ref);
      form.append('top_k', topk.value);
      for (const img of images.slice(i, i + CHUNK)) form.append('images', img.file, img.file.name);
      // the header lets a balancer route to the replica that caches this prompt (docs/DEPLOY.md)
      const r = await api('/v1/predict', { method: 'POST', form, headers: { 'X-Actprompt-Prompt': ref }, signal: ctx.signal });
      out.push(...r.predictions);
    }
    results.set(key, out);
    status.textContent = `${ref}: ${images.length} image(s).`;
    if (currentRef() === ref) draw();
  }

  function add(files) {
    for (const file of files) if (file.type.startsWith('image/') || /\.(png|jpe?g|gif|bmp|webp|tiff?)$/i.test(file.name)) images.push({ file, url: URL.createObjectURL(file) });
    for (const k of [...results.keys()]) results.delete(k); // the cached answers no longer cover every image
    update().catch((err) => { status.textContent = ''; ctx.showError(err); });
  }

  fileInput.addEventListener('change', () => { add([...fileInput.files]); fileInput.value = ''; });
  drop.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); fileInput.click(); } });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); add([...e.dataTransfer.files]); });
  for (const el of [selA, selB, topk]) el.addEventListener('change', () => update().catch(ctx.showError));
  ctx.signal.addEventListener('abort', () => images.forEach((img) => URL.revokeObjectURL(img.url)));

  clear(ctx.root, h('h1', {}, 'Playground'),
    refs.length ? null : h('p', { class: 'callout' }, 'No prompts yet: train one first (Jobs → New job).'),
    h('div', { class: 'card row wrap' },
      h('div', { class: 'field' }, h('label', { for: 'prompt-a' }, 'Prompt A'), selA),
      h('div', { class: 'field' }, h('label', { for: 'prompt-b' }, 'Prompt B'), selB),
      h('div', { class: 'field' }, h('label', { for: 'top-k' }, 'Top k'), topk),
      h('div', { class: 'field', role: 'group', 'aria-label': 'Which prompt to show' }, h('span', { class: 'label' }, 'Showing'), h('div', { class: 'seg' }, btnA, btnB))),
    fileInput, drop, status, grid);
  draw();
}
