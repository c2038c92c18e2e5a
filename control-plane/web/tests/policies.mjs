// Headless Chromium on the Backups page's policies: the policy made through the API is
// listed with its agent in place, and one made through the form appears and is deleted.
// Driven by agent/tests/it/backups.rs, which passes the url and the login.
import { pageTest } from './browser.mjs';

await pageTest('policies', 1200, async (page, shots) => {
  await page.getByRole('link', { name: 'Backups' }).click();
  const nightly = page.locator('tr[data-policy="nightly"]');
  await nightly.getByText('db-1: in place').waitFor({ timeout: 30000 });
  const form = page.locator('#policy-form');
  await form.getByLabel('Name', { exact: true }).fill('weekly-verify');
  await form.getByLabel('Agents (names or patterns with *, comma-separated)').fill('db-1');
  await form.getByLabel('Verify (cron)').fill('0 6 * * 1');
  await form.getByLabel('Full backup (cron)').fill('0 3 * * 0');
  await form.getByRole('button', { name: 'Create policy' }).click();
  const made = page.locator('tr[data-policy="weekly-verify"]');
  await made.waitFor({ timeout: 10000 });
  const error = await page.locator('#policy-error').textContent();
  if (error) throw new Error(`policy error shown: ${error}`);
  await page.screenshot({ path: `${shots}/policies.png`, fullPage: true });
  await made.getByRole('button', { name: 'Delete policy weekly-verify' }).click();
  await made.waitFor({ state: 'detached', timeout: 10000 });
  return 'policies listed, created and deleted on the Backups page';
});
