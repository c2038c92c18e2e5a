"""SqliteHuey on the Outpost task benchmark's workload: durable enqueue, then draining
subprocess tasks (`true`) with the same number of workers. The drain is a phase of its own:
every task is enqueued before the workers start, and the enqueue is not in its time. Prints
one JSON line, with the CPU seconds per drained run (this process and its children)."""
import json, os, resource, subprocess, sys, tempfile, threading, time

from huey import SqliteHuey

enqueue_n, drain_n, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tmp = tempfile.mkdtemp(prefix="huey-bench-")
# Same durability as Outpost's store: fsync on every commit.
huey = SqliteHuey(filename=os.path.join(tmp, "huey.db"), results=False, journal_mode="wal", fsync=True)

@huey.task()
def run_true():
    subprocess.run(["true"], check=True)

start = time.perf_counter()
for _ in range(enqueue_n):
    run_true()
enqueue_s = time.perf_counter() - start
huey.flush()

for _ in range(drain_n):
    run_true()

def worker():
    while True:
        task = huey.dequeue()
        if task is None:
            return
        huey.execute(task)

def cpu_s():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

cpu_before = cpu_s()
start = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
drain_s = time.perf_counter() - start
cpu_per_run_ms = (cpu_s() - cpu_before) / drain_n * 1000
print(json.dumps({"enqueue_per_s": enqueue_n / enqueue_s, "drain_per_s": drain_n / drain_s, "cpu_per_run_ms": cpu_per_run_ms}))
