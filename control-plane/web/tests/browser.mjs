// Shared by the page tests: required environment, and Debian's chromium through
// playwright-core (its own browser download is not used).
import { chromium } from 'playwright-core';

export const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

/** Debian's chromium, headless; `extraArgs` are added to its flags. */
export const launch = (extraArgs = []) => chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', ...extraArgs],
});

/**
 * Log in, wait for the fleet's first agent to be online (up to `onlineMs`), open its page
 * and its terminal, and wait for psql's prompt.
 */
export async function openFirstTerminal(page, url, user, password, onlineMs = 30000) {
  await page.goto(url);
  await logIn(page, user, password);
  const row = page.locator('tr[data-agent]').first();
  await row.locator('td.online').waitFor({ timeout: onlineMs });
  await row.getByRole('link').first().click();
  // The agent page's button (the fleet rows' own buttons stay in the hidden fleet page).
  await page.getByRole('button', { name: 'Open terminal', exact: true }).click();
  await page.waitForFunction(() => window.outpost.state() === 'live', null, { timeout: 30000 });
  await page.waitForFunction(() => /=[>#]/.test(window.outpost.screenText()), null, { timeout: 30000 });
}

/** Fill the login form and submit it. */
export async function logIn(page, user, password) {
  await page.getByLabel('User name').fill(user);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Log in' }).click();
}

/**
 * A page test: log in (OUTPOST_URL, OUTPOST_USER, OUTPOST_PASSWORD), wait for the fleet, then
 * run `steps(page, shots)`, which returns what it showed. Dialogs are accepted; an error on the
 * page fails the test; a failure leaves `failure-NAME.png` in OUTPOST_SCREENSHOTS.
 */
export async function pageTest(name, height, steps) {
  const shots = env('OUTPOST_SCREENSHOTS');
  const browser = await launch();
  const page = await browser.newPage({ viewport: { width: 1280, height } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('dialog', (dialog) => dialog.accept());
  try {
    await page.goto(env('OUTPOST_URL'));
    await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
    await page.getByRole('heading', { name: 'Fleet' }).waitFor();
    const shown = await steps(page, shots);
    if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
    console.log(`ok: ${shown}`);
  } catch (error) {
    await page.screenshot({ path: `${shots}/failure-${name}.png`, fullPage: true }).catch(() => {});
    throw error;
  } finally {
    await browser.close();
  }
}
