// Headless Chromium on the Backups page: the host's row shows its full and incremental
// backups with age, duration and size, and the risk the API gave it. Driven by
// agent/tests/it/backups.rs (a real agent running real pgBackRest), which passes the url, the
// login, the agent's name and the risk to expect.
import { env, launch, logIn } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const agent = env('OUTPOST_AGENT');
const risk = env('OUTPOST_RISK');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
try {
  await page.goto(env('OUTPOST_URL'));
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  await page.getByRole('heading', { name: 'Fleet' }).waitFor();
  await page.getByRole('link', { name: 'Backups' }).click();
  await page.getByRole('heading', { name: 'Backups' }).waitFor();
  const row = page.locator(`tr[data-agent="${agent}"][data-risk="${risk}"]`).first();
  await row.waitFor({ timeout: 30000 });
  for (const type of ['full', 'incr']) {
    const text = await row.locator(`td[data-type="${type}"]`).textContent();
    if (!/ago, took \d+ (s|min|h), [\d.]+ (B|KiB|MiB|GiB)/.test(text)) {
      throw new Error(`the ${type} cell says ${JSON.stringify(text)}`);
    }
  }
  if (page.url().indexOf('#/backups') < 0) throw new Error(`not on the Backups page: ${page.url()}`);
  await page.screenshot({ path: `${shots}/backups-${risk}.png`, fullPage: true });
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log(`ok: backups page shows ${agent} as ${risk}`);
} catch (error) {
  await page.screenshot({ path: `${shots}/failure-backups-${risk}.png`, fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
