// Headless Chromium through `outpost demo`: log in, see the agent online, open its charts,
// create a task, open the terminal and run a query, read the audit log. Driven by
// control-plane/tests/it/demo.rs, which runs the demo and passes its url and password.
import { env, launch, logIn } from './browser.mjs';

const shots = env('OUTPOST_SCREENSHOTS');
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
const step = async (name, fn) => {
  try {
    await fn();
    await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
    console.log(`ok: ${name}`);
  } catch (error) {
    await page.screenshot({ path: `${shots}/failure-${name}.png`, fullPage: true }).catch(() => {});
    throw new Error(`step ${name}: ${error.message}`);
  }
};
// Confirmations (End, Revoke, Delete, Remove) are accepted.
page.on('dialog', (dialog) => dialog.accept());
try {
  await step('login', async () => {
    await page.goto(env('OUTPOST_URL'));
    await logIn(page, env('OUTPOST_USER'), env('OUTPOST_PASSWORD'));
    await page.getByRole('heading', { name: 'Fleet' }).waitFor();
  });

  await step('fleet', async () => {
    const row = page.locator('tr[data-agent="demo-agent"]');
    await row.locator('td.online').waitFor({ timeout: 30000 });
    await row.getByText(/rows,/).waitFor({ timeout: 30000 });
  });

  await step('agent-charts', async () => {
    await page.getByRole('link', { name: 'demo-agent' }).click();
    await page.getByRole('heading', { name: 'Agent demo-agent' }).waitFor();
    // uPlot draws into a canvas once the chart has samples.
    await page.locator('figure.chart[data-type="activity"] canvas').first().waitFor({ timeout: 30000 });
    await page.locator('figure.chart[data-type="database_size"] canvas').first().waitFor({ timeout: 30000 });
  });

  await step('task', async () => {
    await page.getByLabel('Kind', { exact: true }).selectOption('health_check');
    await page.getByRole('button', { name: 'Create task' }).click();
    await page.locator('#task-rows tr', { hasText: 'health_check' }).first().waitFor({ timeout: 15000 });
    const error = await page.locator('#task-error').textContent();
    if (error) throw new Error(`task error shown: ${error}`);
  });

  await step('terminal', async () => {
    await page.getByRole('button', { name: 'Open terminal' }).first().click();
    await page.waitForFunction(() => window.outpost.state() === 'live', null, { timeout: 30000 });
    await page.waitForFunction(() => window.outpost.screenText().includes('=#'), null, { timeout: 30000 });
    await page.locator('#terminal').click();
    await page.keyboard.type('select 6*7;');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => /\n\s*42\s*\n/.test(window.outpost.screenText()), null, { timeout: 30000 });
    // Dead tuples for the agent page's chart.
    await page.keyboard.type('create table demo_t (x int); insert into demo_t select generate_series(1, 100); delete from demo_t;');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => window.outpost.screenText().includes('DELETE 100'), null, { timeout: 30000 });
  });

  // Every statistic the collector stores is drawn (replication: this server has no standby).
  await step('all-charts', async () => {
    await page.getByRole('link', { name: 'Fleet' }).click();
    await page.getByRole('link', { name: 'demo-agent' }).click();
    await page.getByRole('heading', { name: 'Agent demo-agent' }).waitFor();
    for (const title of ['Transaction ID age', 'Dead tuples (most in the latest sample)', 'Checkpoints per minute', 'Buffers written per second']) {
      await page.locator(`figure.chart[data-title="${title}"] canvas`).first().waitFor({ timeout: 60000 });
    }
    await page.locator('figure.chart[data-type="xid_age"] p.note', { hasText: 'from the wraparound limit' }).waitFor({ timeout: 10000 });
    await page.locator('figure.chart[data-type="replication"]', { hasText: 'No standby streams from this server.' }).waitFor({ timeout: 10000 });
  });

  // The fleet is ranked by what needs attention; a fresh demo server needs none.
  await step('fleet-attention', async () => {
    await page.getByRole('link', { name: 'Fleet' }).click();
    await page.locator('#fleet-attention', { hasText: 'Nothing needs attention (1 agent)' }).waitFor({ timeout: 10000 });
    const flagged = await page.locator('td[data-attention]').count();
    if (flagged !== 0) throw new Error(`${flagged} agents flagged on a healthy fleet`);
  });

  // The terminal session above was recorded and is listed for replay.
  await step('recordings', async () => {
    await page.getByRole('link', { name: 'Recordings' }).click();
    await page.getByRole('heading', { name: 'Recordings' }).waitFor();
    await page.locator('#rec-q').fill('demo_t');
    await page.getByRole('button', { name: 'Search' }).click();
    await page.locator('#recording-rows tr').first().waitFor({ timeout: 10000 });
    await page.locator('#recording-rows tr').first().getByRole('link', { name: /^Replay .* at / }).first().click();
    await page.waitForFunction(() => window.outpost.replay().text.includes('demo_t'), null, { timeout: 10000 });
  });

  // The live sessions page lists a session opened through the API, and ends it.
  await step('sessions', async () => {
    const created = await page.evaluate(async () => {
      const agents = await (await fetch('/api/v1/agents')).json();
      const r = await fetch('/api/v1/terminal/sessions', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ agent_id: agents[0].id }),
      });
      return { status: r.status, body: await r.json() };
    });
    if (created.status !== 201) throw new Error(`open a session: ${created.status} ${JSON.stringify(created.body)}`);
    await page.getByRole('link', { name: 'Sessions' }).click();
    const row = page.locator(`tr[data-session="${created.body.session_id}"]`);
    await row.waitFor({ timeout: 10000 });
    await row.getByRole('button', { name: /^End session/ }).click();
    await row.waitFor({ state: 'detached', timeout: 30000 });
    const error = await page.locator('#sessions-error').textContent();
    if (error) throw new Error(`end error shown: ${error}`);
  });

  await step('audit', async () => {
    await page.getByRole('link', { name: 'Audit log' }).click();
    await page.getByRole('heading', { name: 'Audit log' }).waitFor();
    for (const action of ['login', 'task.created', 'terminal.opened']) {
      await page.locator(`#audit-rows tr[data-action="${action}"]`).first().waitFor({ timeout: 15000 });
    }
    // Leaving the terminal page closed the session; its end is recorded once psql is gone.
    const deadline = Date.now() + 20000;
    for (;;) {
      await page.getByLabel('Action').selectOption('terminal.ended');
      await page.waitForTimeout(500);
      if (await page.locator('#audit-rows tr[data-action="terminal.ended"]').count() > 0) break;
      if (Date.now() > deadline) throw new Error('no terminal.ended record after leaving the terminal');
      await page.getByLabel('Action').selectOption('');
    }
  });
  // A viewer sees the fleet and charts but no terminal, task, exec or audit controls.
  await step('viewer', async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const viewer = await context.newPage();
    await viewer.goto(env('OUTPOST_URL'));
    await logIn(viewer, env('OUTPOST_VIEWER'), env('OUTPOST_VIEWER_PASSWORD'));
    await viewer.locator('tr[data-agent="demo-agent"] td.online').waitFor({ timeout: 30000 });
    const hidden = async (locator, what) => {
      if (await locator.isVisible()) throw new Error(`a viewer sees ${what}`);
    };
    await hidden(viewer.getByRole('button', { name: /Open terminal/ }), 'the terminal button');
    await hidden(viewer.getByRole('link', { name: 'Exec' }), 'the exec page');
    await hidden(viewer.getByRole('link', { name: 'Audit log' }), 'the audit log');
    await hidden(viewer.getByRole('link', { name: 'Users' }), 'the users page');
    await hidden(viewer.getByRole('link', { name: 'Tokens' }), 'the tokens page');
    await hidden(viewer.getByRole('link', { name: 'Sessions' }), 'the sessions page');
    await viewer.getByRole('link', { name: 'demo-agent' }).click();
    await viewer.locator('figure.chart[data-type="activity"] canvas').first().waitFor({ timeout: 30000 });
    await hidden(viewer.getByRole('button', { name: 'Create task' }), 'the task form');
    await viewer.screenshot({ path: `${shots}/viewer-agent.png`, fullPage: true });
    // Log out: back to the login form, and the session cookie no longer works.
    await viewer.getByRole('button', { name: 'Log out' }).click();
    await viewer.getByRole('button', { name: 'Log in' }).waitFor({ timeout: 10000 });
    const status = await viewer.evaluate(async () => (await fetch('/api/v1/me')).status);
    if (status !== 401) throw new Error(`after logging out /api/v1/me answered ${status}`);
    await context.close();
  });
  // Admin pages: revoke the viewer's API token, change and disable the viewer, remove the agent.
  await step('tokens', async () => {
    await page.getByRole('link', { name: 'Tokens' }).click();
    await page.getByRole('heading', { name: 'Tokens' }).waitFor();
    await page.locator('#token-rows tr', { hasText: 'this login' }).waitFor({ timeout: 10000 });
    const watcher = page.locator('#token-rows tr', { hasText: 'watcher' });
    await watcher.first().waitFor({ timeout: 10000 });
    const before = await watcher.count();
    await watcher.first().getByRole('button', { name: /Revoke token/ }).click();
    await page.waitForFunction((n) => document.querySelectorAll('#token-rows tr').length > 0
      && [...document.querySelectorAll('#token-rows tr')].filter((r) => r.textContent.includes('watcher')).length === n - 1, before, { timeout: 10000 });
    const error = await page.locator('#tokens-error').textContent();
    if (error) throw new Error(`revoke error shown: ${error}`);
  });
  await step('users', async () => {
    await page.getByRole('link', { name: 'Users' }).click();
    await page.getByRole('heading', { name: 'Users' }).waitFor();
    const row = page.locator('tr[data-user="watcher"]');
    await row.waitFor({ timeout: 10000 });
    await row.getByLabel('Role of watcher').selectOption('operator');
    await page.waitForFunction(() => document.querySelector('tr[data-user="watcher"] select')?.value === 'operator', null, { timeout: 10000 });
    await page.locator('tr[data-user="watcher"]').getByRole('button', { name: 'Disable watcher' }).click();
    await page.locator('tr[data-user="watcher"]', { hasText: 'disabled' }).waitFor({ timeout: 10000 });
    // The last admin cannot demote itself: the refusal is shown.
    await page.locator('tr[data-user="admin"]').getByLabel('Role of admin').selectOption('viewer');
    await page.locator('#users-error', { hasText: 'last enabled admin' }).waitFor({ timeout: 10000 });
  });
  await step('remove-agent', async () => {
    await page.getByRole('link', { name: 'Fleet' }).click();
    await page.getByRole('link', { name: 'demo-agent' }).click();
    await page.getByRole('heading', { name: 'Agent demo-agent' }).waitFor();
    await page.getByRole('button', { name: 'New credential' }).click();
    await page.locator('#agent-rekey-command', { hasText: "outpost-agent enroll --force --token 'ope_" }).waitFor({ timeout: 10000 });
    await page.getByRole('button', { name: 'Remove agent' }).click();
    await page.getByRole('heading', { name: 'Fleet' }).waitFor();
    await page.locator('#fleet-empty').waitFor({ state: 'visible', timeout: 10000 });
  });
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log('demo in the browser ok');
} finally {
  await browser.close();
}
