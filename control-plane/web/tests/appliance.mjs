// Headless Chromium against the appliance (deploy/test.sh), through its TLS proxy: log in,
// open the demo agent's psql terminal and read a query result; then wait while the test kills
// the replica holding the agent's channel, and read a second result in the same session.
// Chromium trusts the proxy's certificate by its public key (OUTPOST_SPKI), not by ignoring
// certificate errors.
import { existsSync } from 'node:fs';
import { env, launch, openFirstTerminal } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const signal = env('OUTPOST_FAILOVER_DONE');
const browser = await launch([`--ignore-certificate-errors-spki-list=${env('OUTPOST_SPKI')}`]);
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const result = (text) => page.waitForFunction(
  (t) => new RegExp(`\\n\\s*${t}\\s*\\n`).test(window.outpost.screenText()),
  text,
  { timeout: 30000 },
);
const query = async (sql) => {
  await page.locator('#terminal').click();
  await page.keyboard.type(sql);
  await page.keyboard.press('Enter');
};
try {
  await openFirstTerminal(page, env('OUTPOST_URL'), env('OUTPOST_USER'), env('OUTPOST_PASSWORD'), 60000);
  await query("select 'before' || '-' || 1 + 1 as x;");
  await result('before-2');
  await page.screenshot({ path: `${shots}/appliance-terminal-before.png`, fullPage: true });
  console.log('ready: terminal live');
  const deadline = Date.now() + 180000;
  while (!existsSync(signal)) {
    if (Date.now() > deadline) throw new Error(`${signal} never appeared`);
    await new Promise((r) => setTimeout(r, 200));
  }
  await page.waitForFunction(() => window.outpost.state() === 'live', null, { timeout: 60000 });
  await query("select 'after' || '-' || 2 + 2 as x;");
  await result('after-4');
  await page.screenshot({ path: `${shots}/appliance-terminal-after.png`, fullPage: true });
  console.log('ok: the terminal session came back after the replica was killed');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure-appliance-terminal.png`, fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
