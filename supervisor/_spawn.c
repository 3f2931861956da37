/*
 * supd's fast spawn path: clone(CLONE_VM | CLONE_VFORK), set up the clean slate, execve.
 *
 * Loaded with ctypes (supervisor/spawn.py); it has no Python API. Why it exists: a
 * fork() of the ~40 MB daemon costs milliseconds of copy-on-write, and posix_spawn()
 * cannot set PR_SET_PDEATHSIG, switch users or join a cgroup. Like glibc's posix_spawn
 * (and CPython's _posixsubprocess with vfork), the child borrows the parent's memory
 * until it execs, so it may only make system calls: no malloc, no stdio, no locks. The
 * parent is suspended until then, which also means the child can hand back why it
 * failed through the request itself (`error`, `step`), with no pipe and no race.
 *
 * Signals: the parent blocks every signal around the clone, so that no handler of the
 * daemon can run in the child on the shared memory; the child resets every disposition
 * to SIG_DFL and only then unblocks (an empty mask, as programs expect).
 *
 * User switching uses the raw system calls: glibc's setuid() would try to synchronise
 * the threads of the borrowed process, which this child is not.
 *
 * File descriptors: a child that gets a copy of the daemon's fd table (clone without
 * CLONE_FILES) costs O(daemon's fds) twice: the copy (a reference taken on every open
 * file) and the exec, which closes each close-on-exec fd one by one. With 10,000
 * programs that is 20,000 pipes, about 1.8 ms of CPU per spawn, paid on every start
 * and restart. So, given `slots` (a few fds reserved low in the table, parked on
 * /dev/null), the parent moves what the child needs into the slots, the child shares
 * the table (CLONE_FILES) and leaves it with close_range(top slot + 1, ~0,
 * CLOSE_RANGE_UNSHARE), which copies only the fds below: O(1) whatever the daemon
 * holds. The parent's table is never changed by the child; the parent parks the slots
 * on /dev/null again once the child has exec'd, so it keeps no reference to a pipe's
 * write end. Without close_range (Linux < 5.9) the child unshares the whole table,
 * which is the old cost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Which step failed; spawn.py maps these to words. Keep the two lists in step. */
enum supd_step {
    STEP_NONE = 0,
    STEP_CLONE,
    STEP_SETSID,
    STEP_FDS,
    STEP_CHDIR,
    STEP_RLIMIT,
    STEP_CGROUP,
    STEP_GROUPS,
    STEP_GID,
    STEP_UID,
    STEP_PDEATHSIG,
    STEP_PARENT_GONE,
    STEP_EXEC,
};

struct supd_spawn_request {
    const char *path;        /* what execve runs, already resolved */
    char *const *argv;
    char *const *envp;
    int fds[3];              /* become the child's 0, 1 and 2 */
    const char *cwd;         /* NULL: stay in the daemon's folder */
    int umask;               /* -1: keep */
    int set_nofile;          /* give the child this RLIMIT_NOFILE */
    uint64_t nofile_cur;
    uint64_t nofile_max;
    int cgroup_fd;           /* an open cgroup directory to start in, or -1 */
    int switch_user;         /* then: */
    uint32_t uid;
    uint32_t gid;
    int ngroups;
    const uint32_t *groups;
    int pdeathsig;           /* 0: none */
    int parent_pid;          /* the child exits if its parent is no longer this */
    /* out */
    int error;               /* errno of the failed step */
    int step;                /* enum supd_step */
    int into_cgroup;         /* 1: born in the cgroup (clone3 CLONE_INTO_CGROUP) */
    /* in: fds reserved low in the table for fds[0..2] and cgroup_fd, all parked on
     * park_fd (or slots[0] = -1: copy the table, the slow way) */
    int slots[4];
    int park_fd;
    /* the fds the child reads: `fds` and `cgroup_fd`, or the slots holding them */
    int child_fds[3];
    int child_cgroup_fd;
    int share_files;
};

#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1)
#endif

/* Where both exist (i386, 32-bit arm...), the plain SYS_setresuid and the others take
 * 16-bit ids, which would turn uid 100000 into 34464: glibc itself calls the 32-bit
 * ones there. x86_64 has only the 32-bit calls, under the plain names. */
#ifdef SYS_setresuid32
#define SUPD_SYS_SETGROUPS SYS_setgroups32
#define SUPD_SYS_SETRESGID SYS_setresgid32
#define SUPD_SYS_SETRESUID SYS_setresuid32
#else
#define SUPD_SYS_SETGROUPS SYS_setgroups
#define SUPD_SYS_SETRESGID SYS_setresgid
#define SUPD_SYS_SETRESUID SYS_setresuid
#endif

static char child_stack[64 * 1024] __attribute__((aligned(16)));

static int fail(struct supd_spawn_request *req, int step)
{
    req->error = errno;
    req->step = step;
    _exit(127);
}

static int child_main(void *arg)
{
    struct supd_spawn_request *req = arg;
    struct sigaction dfl;
    sigset_t empty;
    int i;

    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (i = 1; i < NSIG; i++) {
        if (i != SIGKILL && i != SIGSTOP)
            sigaction(i, &dfl, NULL); /* glibc's reserved ones fail with EINVAL: fine */
    }
    if (setsid() < 0)
        fail(req, STEP_SETSID);
    if (req->share_files) {
        /* Nothing above touches an fd: the table is still the parent's. Keep only
         * the fds up to the last slot in a private table (see the comment on top). */
        int top = req->child_fds[0];
        for (i = 1; i < 3; i++)
            if (req->child_fds[i] > top)
                top = req->child_fds[i];
        if (req->child_cgroup_fd > top)
            top = req->child_cgroup_fd;
#ifdef SYS_close_range
        if (syscall(SYS_close_range, (unsigned)top + 1, ~0U, CLOSE_RANGE_UNSHARE) < 0)
#endif
            if (unshare(CLONE_FILES) < 0)
                fail(req, STEP_FDS);
    }
    for (i = 0; i < 3; i++) {
        if (req->child_fds[i] == i) {
            /* Already in place: dup2 would be a no-op and keep close-on-exec. */
            int flags = fcntl(i, F_GETFD);
            if (flags < 0 || fcntl(i, F_SETFD, flags & ~FD_CLOEXEC) < 0)
                fail(req, STEP_FDS);
        } else if (dup2(req->child_fds[i], i) < 0) {
            fail(req, STEP_FDS);
        }
    }
    if (req->cwd != NULL && chdir(req->cwd) < 0)
        fail(req, STEP_CHDIR);
    if (req->umask >= 0)
        umask((mode_t)req->umask);
    if (req->set_nofile) {
        struct rlimit limit = {(rlim_t)req->nofile_cur, (rlim_t)req->nofile_max};
        if (setrlimit(RLIMIT_NOFILE, &limit) < 0)
            fail(req, STEP_RLIMIT);
    }
    /* Not born in it (no clone3 here): join the cgroup while still privileged; "0"
     * means the writing process. A migration costs an RCU grace period (~10 ms) when
     * none happened just before, which clone3 avoids. */
    if (req->child_cgroup_fd >= 0 && !req->into_cgroup) {
        int procs = openat(req->child_cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) != 1)
            fail(req, STEP_CGROUP);
        close(procs);
    }
    if (req->switch_user) {
        if (syscall(SUPD_SYS_SETGROUPS, req->ngroups, req->groups) < 0)
            fail(req, STEP_GROUPS);
        if (syscall(SUPD_SYS_SETRESGID, req->gid, req->gid, req->gid) < 0)
            fail(req, STEP_GID);
        if (syscall(SUPD_SYS_SETRESUID, req->uid, req->uid, req->uid) < 0)
            fail(req, STEP_UID);
    }
    /* After the uid change, which clears it. */
    if (req->pdeathsig > 0) {
        if (prctl(PR_SET_PDEATHSIG, req->pdeathsig) < 0)
            fail(req, STEP_PDEATHSIG);
        if (getppid() != req->parent_pid) {
            errno = ESRCH; /* supd died before the prctl: nobody would stop us */
            fail(req, STEP_PARENT_GONE);
        }
    }
#ifdef SYS_close_range
    /* Only 0-2 reach the program, inheritable or not (close-on-exec does the rest
     * where close_range is missing). The table is small here unless unshared whole. */
    syscall(SYS_close_range, 3U, ~0U, 0U);
#endif
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
    execve(req->path, req->argv, req->envp);
    return fail(req, STEP_EXEC);
}

#if defined(__x86_64__) && defined(SYS_clone3)
/* clone3(2) has no glibc wrapper: the raw system call, with the child's side written
 * here. The child starts on `stack` with every register but rax, rcx and r11 as the
 * parent had them: it calls child_main(arg), which execs or _exits, and never returns
 * into this frame (which the parent, suspended by CLONE_VFORK, still owns). */
struct supd_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};
#define SUPD_CLONE_INTO_CGROUP 0x200000000ULL

static long clone3_vfork(struct supd_spawn_request *req)
{
    struct supd_clone_args args;
    long ret;
    register long fn __asm__("r12") = (long)child_main;
    register long arg __asm__("r13") = (long)req;

    memset(&args, 0, sizeof args);
    args.flags = CLONE_VM | CLONE_VFORK | SUPD_CLONE_INTO_CGROUP;
    if (req->share_files)
        args.flags |= CLONE_FILES;
    args.exit_signal = SIGCHLD;
    args.stack = (uint64_t)(uintptr_t)child_stack;
    args.stack_size = sizeof child_stack;
    args.cgroup = (uint64_t)req->cgroup_fd;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov $60, %%eax\n\t" /* exit, should child_main ever return */
        "syscall\n\t"
        "hlt\n\t"
        "1:\n\t"
        : "=a"(ret)
        : "0"((long)SYS_clone3), "D"(&args), "S"(sizeof args), "r"(fn), "r"(arg)
        : "rcx", "r11", "memory");
    return ret; /* the child's pid, or -errno */
}
#endif

/* Put `fd` in `slot` for the child (nothing to do when it is there already). */
static int fill_slot(int fd, int slot)
{
    return fd == slot ? 0 : dup3(fd, slot, O_CLOEXEC);
}

/* The fds the child is to read, in req->child_fds and child_cgroup_fd: the slots when
 * there are slots and they could be filled (then share_files), else the fds as given. */
static void choose_child_fds(struct supd_spawn_request *req)
{
    int i;

    req->share_files = 0;
    for (i = 0; i < 3; i++)
        req->child_fds[i] = req->fds[i];
    req->child_cgroup_fd = req->cgroup_fd;
    if (req->slots[0] < 0)
        return;
    for (i = 0; i < 3; i++)
        if (fill_slot(req->fds[i], req->slots[i]) < 0)
            return;
    if (req->cgroup_fd >= 0 && fill_slot(req->cgroup_fd, req->slots[3]) < 0)
        return;
    for (i = 0; i < 3; i++)
        req->child_fds[i] = req->slots[i];
    if (req->cgroup_fd >= 0)
        req->child_cgroup_fd = req->slots[3];
    req->share_files = 1;
}

/* Back on /dev/null: the parent keeps no reference to what the child was given. */
static void park_slots(struct supd_spawn_request *req)
{
    int i;

    if (req->slots[0] < 0)
        return;
    for (i = 0; i < 4; i++)
        if (req->slots[i] != req->park_fd)
            dup3(req->park_fd, req->slots[i], O_CLOEXEC);
}

/* The child's pid, or -1 with req->error and req->step saying why (the failed child,
 * if any, is already reaped). */
int supd_spawn(struct supd_spawn_request *req)
{
    sigset_t all, old;
    int pid, saved;

    req->error = 0;
    req->step = STEP_NONE;
    req->into_cgroup = 0;
    choose_child_fds(req);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = -1;
#if defined(__x86_64__) && defined(SYS_clone3)
    if (req->cgroup_fd >= 0) {
        /* Born in its cgroup: no migration. Before Linux 5.7 (ENOSYS, E2BIG, EINVAL)
         * or on any refusal, the clone below joins it from the child instead. */
        req->into_cgroup = 1;
        long ret = clone3_vfork(req);
        if (ret > 0)
            pid = (int)ret;
        else
            req->into_cgroup = 0; /* a failed clone3 ran no child */
    }
#endif
    if (pid < 0)
        pid = clone(child_main, child_stack + sizeof child_stack,
                    CLONE_VM | CLONE_VFORK | (req->share_files ? CLONE_FILES : 0) | SIGCHLD,
                    req);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    park_slots(req);
    if (pid < 0) {
        req->error = saved;
        req->step = STEP_CLONE;
        return -1;
    }
    if (req->step != STEP_NONE) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    return pid;
}
