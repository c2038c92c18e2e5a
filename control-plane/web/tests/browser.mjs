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
