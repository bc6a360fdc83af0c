// Every call goes through the public API with the key the user signed in with (sessionStorage only).
const KEY = 'actprompt.console.key';
const ROLE = 'actprompt.console.role';

export const auth = {
  get key() { return sessionStorage.getItem(KEY); },
  get role() { return sessionStorage.getItem(ROLE); },
  set(key, role) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(ROLE, role); },
  clear() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(ROLE); },
};

/** An API error with the API's own code and message ({"error": {"code", "message", "param"}}). */
export class ApiError extends Error {
  constructor(status, code, message, param = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

async function errorOf(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON: use the status line */ }
  const e = body && body.error;
  if (e && typeof e.message === 'string') return new ApiError(res.status, e.code, e.message, e.param ?? null);
  return new ApiError(res.status, `http_${res.status}`, `${res.status} ${res.statusText || 'error'}`.trim());
}

function headersFor(key, extra = {}) {
  const h = { ...extra };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** fetch + the error shape. `json` sends a JSON body, `form` a FormData; `raw` returns the Response. */
export async function api(path, { method = 'GET', json, form, headers = {}, key = auth.key, raw = false, signal } = {}) {
  const h = headersFor(key, headers);
  let body;
  if (json !== undefined) { h['Content-Type'] = 'application/json'; body = JSON.stringify(json); }
  else if (form !== undefined) body = form;
  let res;
  try {
    res = await fetch(path, { method, headers: h, body, signal });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network_error', `The server could not be reached (${err.message}).`);
  }
  if (!res.ok) throw await errorOf(res);
  if (raw) return res;
  if (res.status === 204) return null;
  return res.json();
}

/** POST a file as multipart field `file` with upload progress (fetch cannot report it; XHR can). */
export function upload(path, file, onProgress, { key = auth.key, signal } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    if (key) xhr.setRequestHeader('Authorization', `Bearer ${key}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* handled below */ }
      if (xhr.status >= 200 && xhr.status < 300 && body) { onProgress(file.size, file.size); resolve(body); return; }
      const e = body && body.error;
      reject(e ? new ApiError(xhr.status, e.code, e.message, e.param ?? null)
        : new ApiError(xhr.status, `http_${xhr.status}`, `${xhr.status} ${xhr.statusText || 'upload failed'}`));
    };
    xhr.onerror = () => reject(new ApiError(0, 'network_error', 'The upload was interrupted (network error).'));
    xhr.onabort = () => reject(new DOMException('aborted', 'AbortError'));
    if (signal) signal.addEventListener('abort', () => xhr.abort());
    const form = new FormData();
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

/**
 * Server-Sent Events over fetch (EventSource cannot send an Authorization header). Yields
 * {id, event, data} until the server's `end` event; a dropped connection resumes with Last-Event-ID.
 */
export async function* events(path, { signal, key = auth.key } = {}) {
  let lastId = null;
  let failures = 0;
  while (!signal?.aborted) {
    const h = headersFor(key, { Accept: 'text/event-stream' });
    if (lastId !== null) h['Last-Event-ID'] = String(lastId);
    let res;
    try {
      res = await fetch(path, { headers: h, signal });
    } catch (err) {
      if (err.name === 'AbortError') return;
      if (++failures > 5) throw new ApiError(0, 'network_error', `Live updates stopped (${err.message}).`);
      await new Promise((r) => setTimeout(r, 1000 * failures));
      continue;
    }
    if (!res.ok) throw await errorOf(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        failures = 0;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const msg = { id: null, event: 'message', data: '' };
          for (const line of block.split('\n')) {
            if (!line || line.startsWith(':')) continue;
            const i = line.indexOf(':');
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
            if (field === 'id') msg.id = val;
            else if (field === 'event') msg.event = val;
            else if (field === 'data') msg.data += (msg.data ? '\n' : '') + val;
          }
          if (msg.id !== null) lastId = msg.id;
          if (!msg.data) continue; // a comment (": keepalive") or an empty block: nothing to dispatch (SSE spec)
          let data = msg.data;
          try { data = JSON.parse(msg.data); } catch { /* plain text */ }
          yield { id: msg.id, event: msg.event, data };
          if (msg.event === 'end') return;
        }
      }
    } catch (err) {
      if (err.name === 'AbortError') return;
      if (++failures > 5) throw new ApiError(0, 'network_error', `Live updates stopped (${err.message}).`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** Every page of a list endpoint (cursor pagination), up to `max` items. */
export async function listAll(path, { max = 1000, signal } = {}) {
  const out = [];
  let after = null;
  do {
    const sep = path.includes('?') ? '&' : '?';
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ''}`, { signal });
    out.push(...page.data);
    after = page.has_more ? page.next_cursor : null;
  } while (after && out.length < max);
  return out;
}
