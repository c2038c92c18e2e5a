// Headless Chromium through the real page: log in, open psql on the agent, run a query,
// resize, survive a dropped socket; underscores render at a device pixel ratio of 1; the
// closed session is found by a word it printed, replayed and downloaded as a .cast that holds
// the bytes the page showed. Driven by agent/tests/it/terminal.rs, which starts the
// control plane, the agent and Postgres and passes them in the environment.
import { mkdirSync, readFileSync } from 'node:fs';
import { env, launch, logIn } from './browser.mjs';

const url = env('OUTPOST_URL');
const shots = env('OUTPOST_SCREENSHOTS');
mkdirSync(shots, { recursive: true });

const browser = await launch();
const fail = async (page, message) => {
  await page.screenshot({ path: `${shots}/failure.png` }).catch(() => {});
  throw new Error(message);
};
const screenHas = (page, text, count = 1) => page.waitForFunction(
  ([t, n]) => window.outpost.screenText().split(t).length - 1 >= n, [text, count], { timeout: 30000 },
);
/** A screenshot of `text` written into a terminal made with the page's own options. */
const rendered = async (page, text) => {
  await page.evaluate((t) => new Promise((resolve) => {
    document.getElementById('glyph-probe')?.remove();
    const host = document.createElement('div');
    host.id = 'glyph-probe';
    host.style.cssText = 'position:fixed;left:0;top:0;width:400px;height:60px;z-index:99;background:#000';
    document.body.append(host);
    const term = new window.Terminal({ ...window.outpost.terminalOptions(), rows: 2, cols: 30 });
    term.open(host);
    term.write(t, () => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  }), text);
  const shot = await page.locator('#glyph-probe').screenshot();
  await page.evaluate(() => document.getElementById('glyph-probe')?.remove());
  return shot;
};

const page = await browser.newPage({ viewport: { width: 1100, height: 700 }, deviceScaleFactor: 1, acceptDownloads: true });
try {
  await page.goto(url);
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  // Underscores are drawn: with them clipped, both pictures would be the same.
  const underscored = await rendered(page, 'pg_stat_activity');
  const spaced = await rendered(page, 'pg stat activity');
  if (underscored.equals(spaced)) {
    await page.screenshot({ path: `${shots}/underscores.png` });
    throw new Error('underscores are not drawn at a device pixel ratio of 1: pg_stat_activity renders as pg stat activity');
  }
  await page.evaluate(() => window.outpost.keepTranscript());
  await page.getByRole('button', { name: `Open terminal on ${env('OUTPOST_AGENT')}` }).click();
  await page.waitForFunction(() => window.outpost.state() === 'live', null, { timeout: 30000 });
  await screenHas(page, '=#');
  await page.locator('#terminal').click();
  await page.keyboard.type('select 6*7 as answer;');
  await page.keyboard.press('Enter');
  await screenHas(page, '42');
  await page.screenshot({ path: `${shots}/query.png` });

  // Resize: the PTY learns the new size (psql's \! runs stty in the same terminal).
  await page.setViewportSize({ width: 700, height: 500 });
  await page.waitForFunction(() => window.outpost.size().cols < 90, null, { timeout: 10000 });
  await page.waitForTimeout(300);
  const { cols, rows } = await page.evaluate(() => window.outpost.size());
  await page.keyboard.type('\\! stty size');
  await page.keyboard.press('Enter');
  await screenHas(page, `${rows} ${cols}`).catch(() => fail(page, `PTY size is not ${rows} ${cols}`));

  // A dropped socket: the page reconnects from its offset; nothing is shown twice.
  await page.keyboard.type("select 'mark' || 1234;");
  await page.keyboard.press('Enter');
  await screenHas(page, 'mark1234');
  await page.evaluate(() => window.outpost.dropConnection());
  await page.waitForFunction(() => window.outpost.state() === 'reconnecting', null, { timeout: 10000 });
  await page.waitForFunction(() => window.outpost.state() === 'live', null, { timeout: 30000 });
  await page.keyboard.type("select 'after' || 'drop';");
  await page.keyboard.press('Enter');
  await screenHas(page, 'afterdrop');
  const marks = await page.evaluate(() => window.outpost.screenText().split('mark1234').length - 1);
  if (marks !== 1) await fail(page, `output replayed twice after the reconnect (${marks} copies)`);
  await page.screenshot({ path: `${shots}/after-reconnect.png` });

  // Close the session, then find it by a word it printed and replay that moment.
  await page.keyboard.type("select 'needle' || 'word' as found;");
  await page.keyboard.press('Enter');
  await screenHas(page, 'needleword');
  await page.keyboard.type('\\q');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => window.outpost.state() === 'closed', null, { timeout: 30000 });
  const session = await page.evaluate(() => window.outpost.session());
  const shown = await page.evaluate(() => window.outpost.transcript());
  if (!shown.includes('needleword')) await fail(page, 'the page kept no transcript');
  await page.goto(`${url}/#/recordings`);
  await page.locator('#rec-q').fill('needleword');
  await page.getByRole('button', { name: 'Search' }).click();
  const row = page.locator(`tr[data-recording="${session}"]`);
  await row.waitFor({ timeout: 10000 });
  await row.getByRole('link', { name: new RegExp(`^Replay ${session} at `) }).first().click();
  await page.waitForFunction(() => window.outpost.replay().text.includes('needleword'), null, { timeout: 10000 })
    .catch(() => fail(page, 'the replay at the found moment does not show the word'));
  await page.screenshot({ path: `${shots}/replay-at-match.png` });
  // Play from the start at 8× to the end.
  await page.locator('#replay-speed').selectOption('8');
  await page.locator('#replay-seek').fill('0');
  await page.waitForFunction(() => !window.outpost.replay().text.includes('needleword'), null, { timeout: 10000 })
    .catch(() => fail(page, 'seeking to the start did not rebuild the screen'));
  await page.getByRole('button', { name: 'Play' }).click();
  await page.waitForFunction(() => {
    const r = window.outpost.replay();
    return !r.playing && r.shown === r.events && r.text.includes('needleword');
  }, null, { timeout: 60000 }).catch(() => fail(page, 'playing did not reach the end'));
  await page.getByRole('button', { name: 'Verify chain' }).click();
  await page.locator('#replay-verify-out', { hasText: 'Valid' }).waitFor({ timeout: 10000 });

  // The download is asciicast v2 and holds exactly the bytes the page showed.
  const [download] = await Promise.all([page.waitForEvent('download'), page.locator('#replay-download').click()]);
  const castText = readFileSync(await download.path(), 'utf8');
  const lines = castText.split('\n').filter(Boolean);
  const header = JSON.parse(lines[0]);
  if (header.version !== 2 || !(header.width > 0) || !(header.height > 0)) await fail(page, `not an asciicast v2 header: ${lines[0]}`);
  const events = lines.slice(1).map((l) => JSON.parse(l));
  if (!events.every((e) => Array.isArray(e) && e.length === 3 && typeof e[0] === 'number' && ['o', 'i', 'r', 'm'].includes(e[1]))) {
    await fail(page, 'an event is not [time, code, data]');
  }
  const output = events.filter((e) => e[1] === 'o').map((e) => e[2]).join('');
  if (output !== shown) {
    const at = [...output].findIndex((c, i) => c !== shown[i]);
    await fail(page, `the .cast differs from what the page showed (${output.length} vs ${shown.length} chars, first difference at ${at})`);
  }

  // The audit log links the session to its recording and records the replay and download.
  await page.goto(`${url}/#/audit`);
  await page.getByRole('link', { name: `Recording of ${session}` }).first().waitFor({ timeout: 10000 });
  for (const action of ['recording.replayed', 'recording.downloaded']) {
    await page.locator(`tr[data-action="${action}"]`).first().waitFor({ timeout: 10000 });
  }
  console.log('browser terminal ok');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure.png` }).catch(() => {});
  console.log(await page.evaluate(() => window.outpost?.screenText()).catch(() => ''));
  throw error;
} finally {
  await browser.close();
}
