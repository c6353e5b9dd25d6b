// The jobs page as a person sees it: headless Chromium (Debian's package,
// driven by playwright-core) loads `vinetl ui`'s pages, checks what they
// show and saves screenshots. Run by tests/ui.rs:
//
//   node tests/ui/check.cjs UI_URL OUT_DIR '{"running": 3, "failed": 1, "paused": 2, "failedText": "..."}'
//
// NODE_PATH must reach playwright-core; VINETL_CHROMIUM names the browser
// (default /usr/bin/chromium). Exits 1 with a line saying what was wrong.
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [url, outDir, expectJson] = process.argv.slice(2);
const want = JSON.parse(expectJson);

function check(ok, what) {
  if (!ok) throw new Error(what);
}

// The list's rows, as shown: state, progress and the reason under the badge.
async function rows(page) {
  return page.$$eval('tr.job', (trs) =>
    trs.map((tr) => ({
      job: Number(tr.dataset.job),
      state: tr.dataset.state,
      percent: Number(tr.dataset.percent),
      progress: Number(tr.querySelector('progress').value),
      reason: (tr.querySelector('.reason') || { textContent: '' }).textContent,
      badge: getComputedStyle(tr.querySelector('.badge')).backgroundColor,
      rowColour: getComputedStyle(tr.querySelector('td')).backgroundColor,
      eta: tr.querySelector('td.eta').textContent,
    })),
  );
}

(async () => {
  fs.mkdirSync(outDir, { recursive: true });
  // playwright-core gives every launch a fresh profile directory of its own.
  const browser = await chromium.launch({
    executablePath: process.env.VINETL_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const seen = {};
  try {
    const page = await browser.newPage({ viewport: { width: 1360, height: 560 } });
    await page.goto(url + '/');
    check(await page.$('meta[http-equiv="refresh"]'), 'the list refreshes itself');
    let list = await rows(page);
    const row = (id) => list.find((r) => r.job === id);
    const running = row(want.running);
    check(running && running.state === 'running', `job ${want.running} shows running: ${JSON.stringify(list)}`);
    const failed = row(want.failed);
    check(failed && failed.state === 'failed', `job ${want.failed} shows failed: ${JSON.stringify(failed)}`);
    check(failed.reason.includes(want.failedText), `job ${want.failed}'s row says why: ${JSON.stringify(failed)}`);
    check(failed.badge === 'rgb(185, 28, 28)' && failed.rowColour !== running.rowColour,
      `the failed job stands out in red: ${JSON.stringify(failed)}`);
    const paused = row(want.paused);
    check(paused && paused.state === 'paused', `job ${want.paused} shows paused: ${JSON.stringify(paused)}`);
    check(paused.rowColour !== running.rowColour && paused.badge !== running.badge,
      `the paused job stands out: ${JSON.stringify(paused)}`);
    seen.first = running.percent;

    // The running job moves between two loads of the page.
    let moved = null;
    for (let i = 0; i < 40 && moved === null; i++) {
      await page.waitForTimeout(500);
      await page.reload();
      list = await rows(page);
      const now = row(want.running);
      if (now.percent > running.percent) moved = now;
    }
    check(moved, `job ${want.running}'s progress never moved from ${running.percent}%`);
    check(moved.progress === moved.percent, `the bar shows the figure: ${JSON.stringify(moved)}`);
    seen.second = moved.percent;
    seen.eta = moved.eta;
    const listShot = path.join(outDir, 'jobs-page.png');
    await page.screenshot({ path: listShot, fullPage: true });

    // The failed job's page: the error, where an operator looks first.
    await page.setViewportSize({ width: 1360, height: 900 });
    await page.goto(`${url}/jobs/${want.failed}`);
    const reason = await page.textContent('#reason');
    check(reason.includes(want.failedText), `job ${want.failed}'s page says why it failed: ${reason}`);
    const failures = await page.textContent('#failures');
    check(failures.includes(want.failedText) && failures.includes('job_failed'),
      `job ${want.failed}'s failures list its error: ${failures}`);
    const failedShot = path.join(outDir, 'job-failed.png');
    await page.screenshot({ path: failedShot, fullPage: true });

    // The running job's page: calls by outcome, quota used today, outputs.
    await page.goto(`${url}/jobs/${want.running}`);
    const calls = await page.textContent('#calls');
    check(/answered\s*[1-9]/.test(calls), `calls by outcome show answered calls: ${calls}`);
    const quota = await page.textContent('#quota');
    check(/[1-9][\d,]* of [\d,]+ used/.test(quota), `quota used today is shown: ${quota}`);
    check((await page.textContent('#outputs')).length > 0, 'the outputs box is there');
    const runningShot = path.join(outDir, 'job-running.png');
    await page.screenshot({ path: runningShot, fullPage: true });

    // The paused job's page says so, and how to go on.
    await page.goto(`${url}/jobs/${want.paused}`);
    const pausedReason = await page.textContent('#reason');
    check(pausedReason.includes('vinetl resume'), `the paused job's page says how to resume: ${pausedReason}`);

    seen.screenshots = [listShot, failedShot, runningShot];
    console.log(JSON.stringify(seen));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(`tests/ui/check.cjs: ${e.message}`);
  process.exit(1);
});
