// vidpipe status pages: live updates. Polls the JSON API and updates the
// page in place: the video rows and the timeline every 2 s, the counters
// and the stages table every 5 s (their numbers come from whole-table
// counts and Kafka's view, which the server refreshes every 5 s at most).
// Every value from the API (titles, URLs, error texts: hostile input) is
// set as text or as a data attribute, never parsed as HTML.
(() => {
  'use strict';
  const POLL_MS = 2000;
  const OVERVIEW_MS = 5000;
  const STAGES = ['discover', 'download', 'extract-audio', 'transcribe', 'summarize'];
  const body = document.body;

  const setLive = (state) => {
    const dot = document.getElementById('live');
    if (dot) dot.dataset.state = state;
  };

  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };

  const setText = (parent, selector, value) => {
    const e = parent.querySelector(selector);
    const text = value === undefined || value === null ? '' : String(value);
    if (e && e.textContent !== text) e.textContent = text;
  };

  const setData = (e, key, value) => {
    const text = String(value);
    if (e.dataset[key] !== text) e.dataset[key] = text;
  };

  const getJson = async (url) => {
    const r = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.json();
  };

  // One request at a time: a slow answer delays the next poll instead of
  // piling requests up.
  const every = (task, ms = POLL_MS) => {
    let busy = false;
    setInterval(async () => {
      if (busy) return;
      busy = true;
      try {
        await task();
        setLive('live');
      } catch (e) {
        setLive('offline');
      } finally {
        busy = false;
      }
    }, ms);
  };

  const duration = (ms) => {
    if (ms === null || ms === undefined) return '';
    const m = Math.max(0, ms);
    const pad = (n) => String(n).padStart(2, '0');
    if (m < 60000) return `${(m / 1000).toFixed(1)} s`;
    if (m < 3600000) return `${Math.floor(m / 60000)} min ${pad(Math.floor((m % 60000) / 1000))} s`;
    return `${Math.floor(m / 3600000)} h ${pad(Math.floor((m % 3600000) / 60000))} min`;
  };

  const when = (iso) => {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  };

  // --- `/`: the video rows.

  const videoRow = (v) => {
    const tr = el('tr');
    tr.dataset.videoId = v.id;
    const idCell = el('td', 'id');
    const link = el('a', 'video-link', v.id);
    link.href = `/videos/${encodeURIComponent(v.id)}`;
    idCell.appendChild(link);
    tr.appendChild(idCell);
    tr.appendChild(el('td', 'label', v.url));
    const status = el('td', 'status');
    status.appendChild(el('span', 'badge'));
    tr.appendChild(status);
    for (const cls of ['stage', 'generation', 'error']) tr.appendChild(el('td', cls));
    return tr;
  };

  const fillRow = (tr, v) => {
    setData(tr, 'status', v.status);
    setText(tr, '.status .badge', v.status);
    setText(tr, '.stage', v.stage);
    setText(tr, '.generation', v.generation);
    setText(tr, '.error', v.error);
  };

  const updateIndex = async () => {
    const tbody = document.getElementById('videos');
    if (!tbody) return;
    const limit = Number(body.dataset.limit) || 50;
    const videos = await getJson(`/api/v1/videos?limit=${limit}`);
    const rows = new Map();
    for (const tr of tbody.rows) rows.set(tr.dataset.videoId, tr);
    // New videos go above the rows already shown, in the API's order
    // (newest first); known rows stay where they are.
    const anchor = tbody.firstElementChild;
    for (const v of videos) {
      let tr = rows.get(v.id);
      if (!tr) {
        tr = videoRow(v);
        tbody.insertBefore(tr, anchor);
        rows.set(v.id, tr);
      }
      fillRow(tr, v);
    }
    const empty = document.getElementById('no-videos');
    if (empty && videos.length > 0) empty.remove();
  };

  // --- `/`: the counters and the stages table.

  // Kafka's numbers are null until Kafka has answered (as page.rs shows them).
  const orDash = (n) => (n === null || n === undefined ? '-' : String(n));

  const updateOverview = async () => {
    const o = await getJson('/api/v1/overview');
    for (const total of document.querySelectorAll('.total[data-status]')) {
      const n = o.videos[total.dataset.status];
      if (n !== undefined) setText(total, '.n', n);
    }
    for (const tr of document.querySelectorAll('table.stages tr[data-stage]')) {
      const s = o.stages.find((x) => x.stage === tr.dataset.stage);
      if (!s) continue;
      for (const status of ['queued', 'running', 'done', 'failed']) setText(tr, `.${status}`, s.videos[status]);
      setText(tr, '.per-minute', Number(s.done_per_minute).toFixed(1));
      setText(tr, '.lag', orDash(s.lag));
      setText(tr, '.partitions', orDash(s.partitions));
      setText(tr, '.members', orDash(s.members));
    }
    const warning = document.getElementById('kafka-error');
    if (warning) {
      setText(warning, '.why', o.kafka_error);
      const hide = o.kafka_error === null || o.kafka_error === undefined;
      if (warning.hidden !== hide) warning.hidden = hide;
    }
  };

  // --- `/videos/{id}`: the video and its timeline.

  const runItem = (generation, stage) => {
    const li = el('li', 'run');
    li.dataset.stage = stage;
    li.dataset.generation = String(generation);
    li.appendChild(el('span', 'stage', stage));
    li.appendChild(el('span', 'badge status'));
    li.appendChild(el('span', 'generation', `generation ${generation}`));
    for (const cls of ['attempts', 'duration', 'started', 'finished']) li.appendChild(el('span', cls));
    li.appendChild(el('div', 'error'));
    return li;
  };

  const fillRun = (li, run) => {
    const status = run ? run.status : 'pending';
    setData(li, 'status', status);
    setText(li, '.status', status);
    setText(li, '.attempts', run ? `${run.attempts} attempt${run.attempts === 1 ? '' : 's'}` : '');
    setText(li, '.duration', run ? duration(run.duration_ms) : '');
    setText(li, '.started', run ? when(run.started_at) : '');
    setText(li, '.finished', run ? when(run.finished_at) : '');
    const error = run ? [run.error_class, run.error].filter((x) => x).join(': ') : '';
    setText(li, '.error', error);
  };

  // The stages a queued or running video has still to reach in its
  // current generation (as page.rs's pending_stages): from the first stage
  // this generation ran, or the stage a queued replay starts at, to the end.
  const pendingStages = (v, runs) => {
    if (v.status !== 'queued' && v.status !== 'running') return [];
    const ran = (stage) => runs.some((r) => r.generation === v.generation && r.stage === stage);
    let start = STAGES.findIndex(ran);
    if (start < 0) start = Math.max(0, STAGES.indexOf(v.stage));
    return STAGES.slice(start).filter((s) => !ran(s));
  };

  const updateVideo = async () => {
    const id = body.dataset.videoId;
    const t = await getJson(`/api/v1/videos/${encodeURIComponent(id)}/timeline`);
    const v = t.video;
    const section = document.getElementById('video');
    if (section) {
      setData(section, 'status', v.status);
      setText(section, 'dd.status .badge', v.status);
      setText(section, 'dd.stage', v.stage);
      setText(section, 'dd.generation', v.generation);
      setText(section, 'dd.error', v.error);
    }
    const list = document.getElementById('timeline');
    if (!list) return;
    const key = (generation, stage) => `${generation}\u0000${stage}`;
    const shown = new Map();
    for (const li of list.children) shown.set(key(li.dataset.generation, li.dataset.stage), li);
    const wanted = t.runs.map((run) => ({ generation: run.generation, stage: run.stage, run }));
    for (const stage of pendingStages(v, t.runs)) {
      wanted.push({ generation: v.generation, stage, run: null });
    }
    const order = (s) => {
      const i = STAGES.indexOf(s);
      return i < 0 ? STAGES.length : i;
    };
    wanted.sort((a, b) => b.generation - a.generation || order(a.stage) - order(b.stage));
    const keep = new Set();
    wanted.forEach((w, i) => {
      const k = key(w.generation, w.stage);
      keep.add(k);
      const li = shown.get(k) || runItem(w.generation, w.stage);
      fillRun(li, w.run);
      if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
    });
    for (const [k, li] of shown) if (!keep.has(k)) li.remove();
  };

  if (body.dataset.page === 'index') {
    every(updateIndex);
    every(updateOverview, OVERVIEW_MS);
  }
  if (body.dataset.page === 'video') every(updateVideo);
})();
