// Headless Chromium on the exec page: a command on two inventory hosts (one reachable sshd,
// one refused port) shows its output while it still runs, then each host's outcome. Driven
// by control-plane/tests/it/exec.rs.
import { env, launch, logIn } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
try {
  await page.goto(env('OUTPOST_URL'));
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  await page.getByRole('link', { name: 'Exec' }).click();
  await page.getByLabel(/^Command/).fill('sh\n-c\necho first; sleep 3; echo second\nx');
  await page.getByRole('button', { name: 'Run' }).click();
  const db1 = page.getByLabel('output of db1');
  // Live: the first line is on the page while the command still runs.
  await db1.filter({ hasText: 'first' }).waitFor({ timeout: 15000 });
  const early = await db1.textContent();
  if (early.includes('second')) throw new Error('output arrived only at the end');
  await page.screenshot({ path: `${shots}/exec-running.png` });
  await page.getByText(/finished/).waitFor({ timeout: 30000 });
  await db1.filter({ hasText: 'second' }).waitFor();
  await page.locator('h3', { hasText: 'db1' }).locator('.outcome-ok').waitFor();
  await page.locator('h3', { hasText: 'db2' }).locator('.outcome-not_started').waitFor();
  await page.screenshot({ path: `${shots}/exec-finished.png` });
  console.log('exec page ok');
} catch (error) {
  await page.screenshot({ path: `${shots}/exec-failure.png` }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
