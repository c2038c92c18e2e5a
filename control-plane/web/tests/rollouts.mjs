// Headless Chromium on the Rollouts page: a rollout waiting after its canary is listed, its
// waves × hosts show the canary ok and the rest pending, and the Approve button lets it go on.
// Driven by agent/tests/it/rollouts.rs.
import { env, launch, logIn } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
try {
  await page.goto(env('OUTPOST_URL'));
  await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
  await page.getByRole('link', { name: 'Rollouts' }).click();
  await page.getByRole('link', { name: 'ledger' }).click();
  await page.getByRole('status').filter({ hasText: 'awaiting_approval' }).waitFor({ timeout: 15000 });
  await page.getByLabel('db1: ok').waitFor();
  await page.getByLabel('db2: pending').waitFor();
  await page.screenshot({ path: `${shots}/rollout-canary.png` });
  await page.getByRole('button', { name: 'approve' }).click();
  await page.getByRole('status').filter({ hasText: /running|halted/ }).waitFor({ timeout: 15000 });
  await page.getByLabel(/^db3: refused_by_policy/).waitFor({ timeout: 20000 });
  await page.screenshot({ path: `${shots}/rollout-halted.png` });
  console.log('rollouts page ok');
} catch (error) {
  await page.screenshot({ path: `${shots}/rollouts-failure.png` }).catch(() => {});
  throw error;
} finally {
  await browser.close();
}
