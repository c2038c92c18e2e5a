// Headless Chromium against the packaging test's control plane (packaging/test.sh): log in,
// open the terminal of the one agent (installed from its package, running as outpost-agent)
// and read the Postgres role psql runs as.
import { env, launch, openFirstTerminal } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
try {
  await openFirstTerminal(page, env('OUTPOST_URL'), env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  await page.locator('#terminal').click();
  await page.keyboard.type('select current_user;');
  await page.keyboard.press('Enter');
  await page.waitForFunction(
    (role) => new RegExp(`\\n\\s*${role}\\s*\\n`).test(window.outpost.screenText()),
    env('OUTPOST_EXPECT_ROLE'),
    { timeout: 30000 },
  );
  await page.screenshot({ path: `${shots}/packaged-terminal.png`, fullPage: true });
  console.log('ok: terminal');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure-packaged-terminal.png`, fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
