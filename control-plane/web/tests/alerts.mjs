// Headless Chromium on the Alerts page: the firing alert with its agent, the evaluating
// replica, the channel tested from its button, a silence made through the form and ended,
// the rules with their thresholds, and the history. Driven by control-plane/tests/it/alerts.rs,
// which passes the url and the login.
import { pageTest } from './browser.mjs';

await pageTest('alerts', 1400, async (page, shots) => {
  await page.getByRole('link', { name: 'Alerts' }).click();
  const firing = page.locator('#alert-rows tr[data-phase="firing"]');
  await firing.getByText('db1').waitFor({ timeout: 10000 });
  await page.getByText(/1 firing, 0 pending; evaluated by /).waitFor();
  // The rules table is filled by its own request: wait for it rather than count at once.
  await page.waitForFunction(() => document.querySelectorAll('#rule-rows tr').length === 9, null, { timeout: 10000 })
    .catch(() => { throw new Error('not every rule is listed'); });
  await page.locator('#history-rows tr[data-phase="firing"]').first().waitFor();

  await page.getByRole('button', { name: 'Test channel ops' }).click();
  await page.getByText('A test notification reached ops.').waitFor({ timeout: 15000 });

  const form = page.locator('#silence-form');
  await form.getByLabel('Rule', { exact: true }).selectOption('xid_age');
  await form.getByLabel('Agents (names or patterns with *, comma-separated)').fill('db1');
  await form.getByLabel('For (e.g. 2h, at most 7d)').fill('2h');
  await form.getByLabel('Comment').fill('vacuum freeze running');
  await form.getByRole('button', { name: 'Create silence' }).click();
  const silence = page.locator('#silence-rows tr', { hasText: 'vacuum freeze running' });
  await silence.waitFor({ timeout: 10000 });
  const error = await page.locator('#silence-error').textContent();
  if (error) throw new Error(`silence error shown: ${error}`);
  const wform = page.locator('#window-form');
  await wform.getByLabel('Window name').fill('nightly-dump');
  await wform.getByLabel('Starts (cron)').fill('30 2 * * *');
  await wform.getByLabel('Time zone').fill('Europe/Berlin');
  await wform.getByLabel('Lasts').fill('1h');
  await wform.getByLabel('Effect').selectOption('both');
  await wform.getByLabel('No run starts this long before the end').fill('20m');
  await wform.getByRole('button', { name: 'Create window' }).click();
  const window = page.locator('#window-rows tr[data-window="nightly-dump"]');
  await window.waitFor({ timeout: 10000 });
  const effect = await window.locator('td').nth(1).textContent();
  if (effect !== 'both (cutoff 20m)') throw new Error(`effect shown: ${effect}`);
  if (!/(; .*){4}/.test(await window.locator('td').nth(5).textContent())) throw new Error('no five occurrences');
  await page.screenshot({ path: `${shots}/alerts.png`, fullPage: true });
  await silence.getByRole('button', { name: /^End silence / }).click();
  await silence.waitFor({ state: 'detached', timeout: 10000 });
  return 'alerts, channel test, silence made and ended, window (mute and gate, with a cutoff) made with its next five, rules and history on the Alerts page';
});
