// Times one shell command through WeTTY (npm `wetty`, installed by `just bench terminal`):
// starts a WeTTY server running bash, connects over its socket.io protocol like its own page
// does (resize, input, flow-control commits), types the command and reads until the done
// marker. Prints "<bytes> <seconds>".
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';

const dir = process.env.WETTY_DIR;
const command = process.argv[2];
const require = createRequire(`${dir}/`);
const { io } = require('socket.io-client');
const port = 20000 + Math.floor(Math.random() * 20000);
const server = spawn(`${dir}/node_modules/.bin/wetty`, ['--port', String(port), '--host', '127.0.0.1', '--command', 'bash'], { stdio: 'ignore' });
const stop = (code) => { server.kill('SIGKILL'); process.exit(code); };
setTimeout(() => { console.error('WeTTY did not finish within 180 s'); stop(1); }, 180000);

const done = 'BENCH_2_DONE';
let bytes = 0;
let start = 0;
let uncommitted = 0;
let tail = '';
let sent = false;

const connect = () => {
  const socket = io(`http://127.0.0.1:${port}`, { path: '/socket.io', transports: ['websocket'], reconnection: false });
  socket.on('connect_error', () => { socket.close(); setTimeout(connect, 200); });
  socket.on('login', () => {
    socket.emit('resize', { cols: 120, rows: 40 });
    setTimeout(() => {
      start = performance.now();
      sent = true;
      socket.emit('input', `${command}; echo BENCH_$((1+1))_DONE\r`);
    }, 1000);
  });
  socket.on('data', (data) => {
    if (!sent) return;
    bytes += Buffer.byteLength(data);
    uncommitted += data.length;
    if (uncommitted > 131072) { socket.emit('commit', uncommitted); uncommitted = 0; }
    tail = (tail + data).slice(-64);
    if (tail.includes(done)) {
      console.log(`${bytes} ${(performance.now() - start) / 1000}`);
      socket.close();
      stop(0);
    }
  });
};
setTimeout(connect, 300);
