// The browser half of tests/browser.rs: drives Debian's Chromium with
// playwright-core through the status page of `vidpipe serve`, as a person
// would, while the Rust half runs the pipeline and submits the video.
//
// Protocol (stdout, one line each): `ready` once the status page is open and
// does not list the video yet (the Rust side submits only then, so the row
// must appear live); `status <value>` whenever the row's data-status changes;
// `result <json>` at the end. Any failed expectation exits 1 with the reason
// on stderr. Once the row is done, the counters and the stages table must
// catch up on the same page load too (done counter, summarize's done
// count, Kafka's partitions): their values before and after are in the
// result for the Rust side to check.
//
// Environment: VIDPIPE_BASE_URL (http://127.0.0.1:PORT), VIDPIPE_VIDEO_ID,
// VIDPIPE_OUT_DIR (screenshots), VIDPIPE_NODE_DIR (where `npm ci` put
// playwright-core, see scripts/stack), VIDPIPE_CHROMIUM (default
// /usr/bin/chromium), VIDPIPE_BROWSER_TIMEOUT_MS (how long the video may take).

import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';

const STAGES = ['discover', 'download', 'extract-audio', 'transcribe', 'summarize'];

function env(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === '') fail(`${name} is not set`);
  return value;
}

function fail(message) {
  process.stderr.write(`status_page.mjs: ${message}\n`);
  process.exit(1);
}

function say(line) {
  process.stdout.write(`${line}\n`);
}

const base = env('VIDPIPE_BASE_URL').replace(/\/$/, '');
const videoId = env('VIDPIPE_VIDEO_ID');
const outDir = env('VIDPIPE_OUT_DIR');
const nodeDir = env('VIDPIPE_NODE_DIR');
const chromiumPath = env('VIDPIPE_CHROMIUM', '/usr/bin/chromium');
const timeoutMs = Number(env('VIDPIPE_BROWSER_TIMEOUT_MS', '900000'));

if (!existsSync(chromiumPath)) {
  fail(`Chromium is not installed at ${chromiumPath}: scripts/stack up installs it (Debian package chromium)`);
}
let chromium;
try {
  // playwright-core lives in the cache, not next to this file: resolve it
  // from there.
  ({ chromium } = createRequire(path.join(nodeDir, 'package.json'))('playwright-core'));
} catch (e) {
  fail(`playwright-core is not installed in ${nodeDir}: scripts/stack up installs it (${e.message})`);
}

// The row of our video, by attribute value (CSS string escaping).
const rowSelector = `tr[data-video-id="${videoId.replace(/["\\]/g, '\\$&')}"]`;
const shots = [];

async function shot(page, name, fullPage = true) {
  const file = path.join(outDir, name);
  await page.screenshot({ path: file, fullPage });
  shots.push(file);
}

// What the counters and the summarize row of the stages table show.
async function counters(page) {
  return page.evaluate(() => {
    const text = (sel) => document.querySelector(sel)?.textContent.trim() ?? null;
    const row = 'table.stages tr[data-stage="summarize"]';
    return {
      done: text('.total[data-status="done"] .n'),
      summarize_done: text(`${row} .done`),
      summarize_partitions: text(`${row} .partitions`),
      summarize_members: text(`${row} .members`),
      kafka_error_hidden: document.getElementById('kafka-error')?.hidden ?? null,
    };
  });
}

// The video's run shows in the numbers, and Kafka's columns are filled.
function caughtUp(c) {
  return Number(c.done) >= 1 && Number(c.summarize_done) >= 1 && c.kafka_error_hidden === true && c.summarize_partitions !== '-';
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  // As root in a container Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(30_000);
  const pageErrors = [];
  const consoleErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  const navigations = [];
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) navigations.push(f.url());
  });

  const response = await page.goto(`${base}/`);
  if (!response || !response.ok()) fail(`GET / answered ${response && response.status()}`);
  // A reload would drop this: it proves the row came in by polling.
  await page.evaluate(() => {
    window.__vidpipeNoReload = true;
  });
  if ((await page.locator(rowSelector).count()) !== 0) {
    fail(`the status page lists ${videoId} before it was submitted`);
  }
  const countersBefore = await counters(page);
  await shot(page, '01-status-before-submit.png');
  say('ready');

  // Follow the row's data-status as the page updates itself.
  const seen = [];
  const deadline = Date.now() + timeoutMs;
  let appeared = false;
  for (;;) {
    const status = await page.evaluate(
      (sel) => document.querySelector(sel)?.getAttribute('data-status') ?? null,
      rowSelector,
    );
    if (status !== null && !appeared) {
      appeared = true;
      await shot(page, '02-status-row-appeared.png');
    }
    if (status !== null && status !== seen[seen.length - 1]) {
      seen.push(status);
      say(`status ${status}`);
    }
    if (status === 'done' || status === 'failed') break;
    if (Date.now() > deadline) {
      fail(`the row of ${videoId} did not reach done within ${timeoutMs} ms (seen: ${seen.join(' -> ') || 'no row'})`);
    }
    await page.waitForTimeout(250);
  }
  if (seen[seen.length - 1] !== 'done') fail(`the video ended ${seen.join(' -> ')}`);
  // The counters and the stages table poll less often than the rows: give
  // them a few rounds to catch up.
  let countersAfter = await counters(page);
  const countersDeadline = Date.now() + 60_000;
  while (!caughtUp(countersAfter)) {
    if (Date.now() > countersDeadline) {
      fail(`the counters and stages table did not catch up without a reload: ${JSON.stringify(countersAfter)}`);
    }
    await page.waitForTimeout(500);
    countersAfter = await counters(page);
  }
  const noReload = await page.evaluate(() => window.__vidpipeNoReload === true);
  const statusPageLoads = navigations.length;
  await shot(page, '03-status-done.png');
  if (!noReload || statusPageLoads !== 1) {
    fail(`the status page reloaded or navigated: ${JSON.stringify(navigations)}`);
  }

  // The row's link leads to the video's timeline.
  const link = page.locator(`${rowSelector} a.video-link`);
  const href = await link.getAttribute('href');
  const prefix = '/videos/';
  if (!href || !href.startsWith(prefix) || decodeURIComponent(href.slice(prefix.length)) !== videoId) {
    fail(`the row links to ${href}, not to ${prefix}<percent-encoded ${videoId}>`);
  }
  await Promise.all([page.waitForURL((u) => u.pathname.startsWith('/videos/')), link.click()]);
  const videoUrl = page.url();
  await page.locator('[data-stage]').first().waitFor();
  const timeline = await page.locator('[data-stage]').evaluateAll((els) =>
    els.map((e) => ({ stage: e.getAttribute('data-stage'), status: e.getAttribute('data-status') })),
  );
  await shot(page, '04-video.png');
  for (const stage of STAGES) {
    if (!timeline.some((t) => t.stage === stage && t.status === 'done')) {
      fail(`the timeline does not show ${stage} done: ${JSON.stringify(timeline)}`);
    }
  }

  // The transcript link answers with a document; the summary link shows it.
  const transcriptHref = await page.locator('#transcript-link').getAttribute('href');
  const transcript = await page.request.get(new URL(transcriptHref, page.url()).toString());
  const transcriptText = await transcript.text();
  if (!transcript.ok() || transcriptText.trim() === '') {
    fail(`${transcriptHref} answered ${transcript.status()} with ${transcriptText.length} bytes`);
  }
  await Promise.all([page.waitForURL((u) => u.pathname.endsWith('/summary')), page.locator('#summary-link').click()]);
  const summary = (await page.locator('#summary').innerText()).trim();
  await shot(page, '05-summary.png');
  if (summary === '') fail('the summary page shows an empty #summary');

  // For the record: the status page as a fresh load shows it now.
  await page.goto(`${base}/`);
  await page.locator(rowSelector).waitFor();
  await shot(page, '06-status-reloaded.png');

  say(
    `result ${JSON.stringify({
      statuses: seen,
      counters_before: countersBefore,
      counters_after: countersAfter,
      status_page_loads: statusPageLoads,
      no_reload: noReload,
      navigations,
      href,
      video_url: videoUrl,
      timeline,
      transcript_href: transcriptHref,
      transcript_status: transcript.status(),
      summary,
      screenshots: shots,
      page_errors: pageErrors,
      console_errors: consoleErrors,
    })}`,
  );
} finally {
  await browser.close();
}
