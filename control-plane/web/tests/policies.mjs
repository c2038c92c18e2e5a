// Headless Chromium on the Backups page's policies: the policy made through the API is
// listed with its agent in place, and one made through the form appears and is deleted.
// Driven by agent/tests/it/backups.rs, which passes the url and the login.
import { env, launch, logIn } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 1200 } });
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
page.on('dialog', (dialog) => dialog.accept());
try {
  await page.goto(env('OUTPOST_URL'));
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  await page.getByRole('heading', { name: 'Fleet' }).waitFor();
  await page.getByRole('link', { name: 'Backups' }).click();
  const nightly = page.locator('tr[data-policy="nightly"]');
  await nightly.getByText('db-1: in place').waitFor({ timeout: 30000 });
  await page.getByLabel('Name', { exact: true }).fill('weekly-verify');
  await page.getByLabel('Agents (names or patterns with *, comma-separated)').fill('db-1');
  await page.getByLabel('Verify (cron)').fill('0 6 * * 1');
  await page.getByLabel('Full backup (cron)').fill('0 3 * * 0');
  await page.getByRole('button', { name: 'Create policy' }).click();
  const made = page.locator('tr[data-policy="weekly-verify"]');
  await made.waitFor({ timeout: 10000 });
  const error = await page.locator('#policy-error').textContent();
  if (error) throw new Error(`policy error shown: ${error}`);
  await page.screenshot({ path: `${shots}/policies.png`, fullPage: true });
  await made.getByRole('button', { name: 'Delete policy weekly-verify' }).click();
  await made.waitFor({ state: 'detached', timeout: 10000 });
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log('ok: policies listed, created and deleted on the Backups page');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure-policies.png`, fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
