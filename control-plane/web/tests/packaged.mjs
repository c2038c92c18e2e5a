// Headless Chromium against the packaging test's control plane (packaging/test.sh): log in,
// open the terminal of the one agent (installed from its package, running as outpost-agent),
// read the Postgres role psql runs as, and check that psql's `\!` shell runs as the run user
// and cannot read the agent's credential.
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
  // The marker is computed by the shell, so the echo of the typed line does not match it.
  await page.keyboard.type(`\\! id -un; cat ${env('OUTPOST_CREDENTIAL')} || echo refused-$((40+2))`);
  await page.keyboard.press('Enter');
  await page.waitForFunction(
    () => /\nrefused-42/.test(window.outpost.screenText()),
    null,
    { timeout: 30000 },
  );
  const screen = await page.evaluate(() => window.outpost.screenText());
  const user = env('OUTPOST_EXPECT_SHELL_USER');
  if (!new RegExp(`\\n\\s*${user}\\s*\\n`).test(screen) || !/Permission denied/.test(screen)) {
    throw new Error(`\\! should run as ${user} and be refused the credential:\n${screen}`);
  }
  await page.screenshot({ path: `${shots}/packaged-terminal.png`, fullPage: true });
  console.log('ok: terminal');
} catch (error) {
  await page.screenshot({ path: `${shots}/failure-packaged-terminal.png`, fullPage: true }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
