// Headless Chromium through the real page: log in, open psql on the agent, run a query,
// resize, survive a dropped socket. Driven by agent/tests/it/terminal.rs, which starts the
// control plane, the agent and Postgres and passes them in the environment.
import { mkdirSync } from 'node:fs';
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
const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
try {
  await page.goto(url);
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
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
  console.log('browser terminal ok');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure.png` }).catch(() => {});
  console.log(await page.evaluate(() => window.outpost?.screenText()).catch(() => ''));
  throw error;
} finally {
  await browser.close();
}
