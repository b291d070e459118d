/*
 * ksmlab helper: a tiny process whose address space ksmlab.backends.linux
 * drives over a Unix SOCK_SEQPACKET channel.
 *
 * Why C and not Python: under prctl(PR_SET_MEMORY_MERGE) every compatible
 * VMA of the process becomes mergeable, and a Python interpreter's heap holds
 * thousands of identical (mostly zero) pages that would pollute the global
 * KSM counters.  This helper keeps almost nothing in memory besides what the
 * caller maps, and takes that little out of merging (withdraw_own).
 *
 * Usage: ksmlab-helper CHANNEL_FD ROLE      (ROLE is "stub" or "helper")
 *
 * ROLE "stub" is how the driver starts a helper: the process forks; the
 * child becomes the helper, and the parent (the "stub", the driver's own
 * child) becomes a child subreaper that does nothing but reap.  Helpers
 * forked from helpers are thus never re-parented to init when their parent
 * exits first (init may not reap them promptly); the stub reaps them and
 * exits once it has no descendants left.  ROLE "helper" is used on exec.
 *
 * Protocol (one datagram per message):
 *   request  = struct req, followed by req.pathlen bytes of path (no NUL)
 *   reply    = one int64: >= 0 is the result, -errno is a failure
 * On start (and after a successful exec) the helper sends its pid as an
 * unsolicited "hello" reply.  OP_EXIT gets no reply: the process is gone.
 * OP_FORK carries the child's channel fd as SCM_RIGHTS; the parent replies
 * with the child's pid and the child sends its hello on the new channel.
 * If the channel reaches EOF (the driver died), the helper exits, so no
 * helper outlives the Python process that drives it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

enum {
	OP_MMAP = 1,     /* a0 addr, a1 len, a2 prot, a3 flags, a4 node+1 (0 = none), a5 offset */
	OP_MUNMAP = 2,   /* a0 addr, a1 len */
	OP_MPROTECT = 3, /* a0 addr, a1 len, a2 prot */
	OP_MADVISE = 4,  /* a0 addr, a1 len, a2 advice */
	OP_PRCTL = 5,    /* a0 option, a1..a4 arg2..arg5 */
	OP_FORK = 6,     /* SCM_RIGHTS: the child's channel */
	OP_EXEC = 7,
	OP_EXIT = 8,
};

struct req {
	uint32_t op;
	uint32_t pathlen;
	uint64_t a[6];
};

#define MAX_PATH 4096
#define MPOL_BIND_ 2
#define MAX_NODES 1024
#define MAP_TYPE_ 0x0f
#define MADV_POPULATE_READ_ 22
#define MADV_POPULATE_WRITE_ 23
#define PR_SET_THP_DISABLE_ 41
#define PR_GET_THP_DISABLE_ 42
#define PR_THP_DISABLE_EXCEPT_ADVISED_ (1 << 1) /* Linux 6.18 */
#define MADV_HUGEPAGE_ 14
#define MADV_UNMERGEABLE_ 13
#define PR_SET_MEMORY_MERGE_ 67
#define PR_GET_MEMORY_MERGE_ 68
#define MAX_OWN 64

static int chan_fd = -1;
/* The areas the helper had before any OP_MMAP: its own data, bss, heap, stack. */
static uintptr_t own_start[MAX_OWN], own_end[MAX_OWN];
static int own_count;
static char maps_buf[16384];
static char self_path[MAX_PATH];
static unsigned char msgbuf[sizeof(struct req) + MAX_PATH + 1];

static void reply(int64_t v)
{
	/* A failed send means the driver is gone; the next recv sees EOF. */
	(void)send(chan_fd, &v, sizeof(v), MSG_NOSIGNAL);
}

static int64_t neg_errno(void)
{
	return -(int64_t)errno;
}

static int64_t do_mmap(const struct req *r, const char *path)
{
	void *addr = (void *)(uintptr_t)r->a[0];
	size_t len = (size_t)r->a[1];
	int prot = (int)r->a[2];
	int flags = (int)r->a[3];
	uint64_t node1 = r->a[4];
	off_t offset = (off_t)r->a[5];
	int fd = -1;
	int populate = 0;
	void *p;

	if (path) {
		int type = flags & MAP_TYPE_;
		int mode = (type == MAP_SHARED || type == MAP_SHARED_VALIDATE) ? O_RDWR : O_RDONLY;

		fd = open(path, mode | O_CLOEXEC);
		if (fd < 0)
			return neg_errno();
	}
	/* Bind before anything is faulted in: populate only after mbind. */
	if (node1 && (flags & MAP_POPULATE)) {
		flags &= ~MAP_POPULATE;
		populate = 1;
	}
	p = mmap(addr, len, prot, flags, fd, offset);
	if (p == MAP_FAILED) {
		int64_t e = neg_errno();

		if (fd >= 0)
			close(fd);
		return e;
	}
	if (fd >= 0)
		close(fd);
	if (node1) {
		unsigned long mask[MAX_NODES / (8 * sizeof(unsigned long))];
		uint64_t node = node1 - 1;

		if (node >= MAX_NODES) {
			munmap(p, len);
			return -EINVAL;
		}
		memset(mask, 0, sizeof(mask));
		mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
		if (syscall(SYS_mbind, p, len, MPOL_BIND_, mask, (unsigned long)MAX_NODES, 0) != 0) {
			int64_t e = neg_errno();

			munmap(p, len);
			return e;
		}
		if (populate) {
			int advice = (prot & PROT_WRITE) ? MADV_POPULATE_WRITE_ : MADV_POPULATE_READ_;

			if (madvise(p, len, advice) != 0) {
				int64_t e = neg_errno();

				munmap(p, len);
				return e;
			}
		}
	}
	return (int64_t)(uintptr_t)p;
}

static int64_t do_fork(int newfd)
{
	pid_t pid;

	if (newfd < 0)
		return -EBADF;
	pid = fork();
	if (pid < 0) {
		int64_t e = neg_errno();

		close(newfd);
		return e;
	}
	if (pid == 0) {
		/* Child: take over the new channel at the same fd number. */
		if (dup2(newfd, chan_fd) < 0)
			_exit(127);
		close(newfd);
		reply((int64_t)getpid());
		return INT64_MIN; /* no reply: the hello above was it */
	}
	close(newfd);
	return (int64_t)pid;
}

static int64_t do_exec(void)
{
	char fdstr[16];
	char *argv[4];
	extern char **environ;

	snprintf(fdstr, sizeof(fdstr), "%d", chan_fd);
	argv[0] = self_path;
	argv[1] = fdstr;
	argv[2] = "helper";
	argv[3] = NULL;
	/* The channel has no FD_CLOEXEC, so it survives; prctl MERGE_ANY survives too. */
	execve("/proc/self/exe", argv, environ);
	return neg_errno();
}

/*
 * Read /proc/self/maps into maps_buf (no stdio: a FILE buffer would be heap
 * the helper did not have before).  Returns the length, 0 on failure.
 */
static size_t read_maps(void)
{
	size_t len = 0;
	ssize_t n;
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 0;
	while (len < sizeof(maps_buf) - 1
	       && (n = read(fd, maps_buf + len, sizeof(maps_buf) - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	maps_buf[len] = '\0';
	return len;
}

/* Calls fn(start, end) for each line of maps_buf. */
static void each_area(void (*fn)(uintptr_t, uintptr_t))
{
	char *line = maps_buf;

	while (*line) {
		char *end;
		uintptr_t a = (uintptr_t)strtoull(line, &end, 16);
		uintptr_t b = (*end == '-') ? (uintptr_t)strtoull(end + 1, NULL, 16) : 0;

		if (b > a)
			fn(a, b);
		line = strchr(line, '\n');
		if (!line)
			break;
		line++;
	}
}

static void remember_own(uintptr_t a, uintptr_t b)
{
	if (own_count < MAX_OWN) {
		own_start[own_count] = a;
		own_end[own_count] = b;
		own_count++;
	}
}

static void withdraw_if_own(uintptr_t a, uintptr_t b)
{
	int i;

	/* An area that overlaps one of the start-up areas is one of them (the stack grew). */
	for (i = 0; i < own_count; i++)
		if (a < own_end[i] && own_start[i] < b) {
			/* Areas KSM never touches ignore the advice; failures change nothing. */
			madvise((void *)a, b - a, MADV_UNMERGEABLE_);
			return;
		}
}

/*
 * prctl(PR_SET_MEMORY_MERGE) marks every compatible area of the process
 * mergeable, the helper's own data, bss, heap and stack included, and sets
 * them again after exec.  The model's processes have only the caller's
 * areas, so the helper takes its own back out with MADV_UNMERGEABLE: the
 * global counters (general_profit, pages_sharing, ksm_rmap_items) are then
 * the caller's memory alone.  Model choice of the instrument, not of the
 * kernel: a real program's own memory would be merged.
 */
static void withdraw_own(void)
{
	if (prctl(PR_GET_MEMORY_MERGE_, 0, 0, 0, 0) == 1 && read_maps())
		each_area(withdraw_if_own);
}

static void setup(void)
{
	struct sigaction sa;

	/* Reap our children automatically so they never linger as zombies. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	sa.sa_flags = SA_NOCLDWAIT;
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

static void stub(void)
{
	pid_t pid;

	/* Orphaned descendants are re-parented here, not to init. */
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	pid = fork();
	if (pid < 0) {
		reply(-(int64_t)errno);
		_exit(1);
	}
	if (pid == 0)
		return; /* the helper */
	close(chan_fd);
	/* Reap the helper and every orphan; wait() fails with ECHILD when none is left. */
	for (;;) {
		if (wait(NULL) < 0 && errno != EINTR)
			_exit(0);
	}
}

int main(int argc, char **argv)
{
	ssize_t n;

	if (argc < 3)
		return 2;
	chan_fd = atoi(argv[1]);
	n = readlink("/proc/self/exe", self_path, sizeof(self_path) - 1);
	if (n <= 0)
		return 3;
	self_path[n] = '\0';
	/*
	 * Transparent huge pages only where the caller asked for them with
	 * madvise(MADV_HUGEPAGE), as the model has them (THP mode "madvise"):
	 * on a host in mode "always" the helper's other memory (and the
	 * caller's ordinary mappings) keep 4 KiB pages.  Linux 6.18 has the
	 * flag PR_THP_DISABLE_EXCEPT_ADVISED for exactly that; an older kernel
	 * refuses it (EINVAL), and then THP is disabled outright until the
	 * first MADV_HUGEPAGE (see OP_MADVISE).  MMF_DISABLE_THP is an mm flag:
	 * it is inherited across fork and exec (and set again here after exec
	 * anyway), and it does not show in smaps VmFlags.
	 */
	if (prctl(PR_SET_THP_DISABLE_, 1, PR_THP_DISABLE_EXCEPT_ADVISED_, 0, 0) != 0)
		prctl(PR_SET_THP_DISABLE_, 1, 0, 0, 0);
	if (strcmp(argv[2], "stub") == 0)
		stub();
	setup();
	if (read_maps())
		each_area(remember_own);
	withdraw_own(); /* after exec under MERGE_ANY */
	reply((int64_t)getpid());

	for (;;) {
		struct req r;
		struct iovec iov = { msgbuf, sizeof(msgbuf) };
		union {
			struct cmsghdr h;
			char buf[CMSG_SPACE(sizeof(int))];
		} cbuf;
		struct msghdr mh;
		struct cmsghdr *c;
		const char *path = NULL;
		int rfd = -1;
		int64_t ret;

		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof(cbuf.buf);
		n = recvmsg(chan_fd, &mh, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			_exit(0); /* EOF: the driver is gone */
		for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				memcpy(&rfd, CMSG_DATA(c), sizeof(int));
		if ((size_t)n < sizeof(r)) {
			reply(-EPROTO);
			continue;
		}
		memcpy(&r, msgbuf, sizeof(r));
		if (r.pathlen) {
			if (r.pathlen > MAX_PATH || sizeof(r) + r.pathlen != (size_t)n) {
				reply(-EPROTO);
				continue;
			}
			msgbuf[sizeof(r) + r.pathlen] = '\0';
			path = (const char *)msgbuf + sizeof(r);
		}
		if (rfd >= 0 && r.op != OP_FORK) {
			close(rfd);
			rfd = -1;
		}
		errno = 0;
		switch (r.op) {
		case OP_MMAP:
			ret = do_mmap(&r, path);
			break;
		case OP_MUNMAP:
			ret = munmap((void *)(uintptr_t)r.a[0], (size_t)r.a[1]) ? neg_errno() : 0;
			break;
		case OP_MPROTECT:
			ret = mprotect((void *)(uintptr_t)r.a[0], (size_t)r.a[1], (int)r.a[2])
				? neg_errno() : 0;
			break;
		case OP_MADVISE:
			/*
			 * A kernel without PR_THP_DISABLE_EXCEPT_ADVISED: a process
			 * asking for huge pages gets them (it clears its own
			 * THP-disable, for all its areas, before any fault there).
			 */
			if ((int)r.a[2] == MADV_HUGEPAGE_
			    && prctl(PR_GET_THP_DISABLE_, 0, 0, 0, 0) == 1)
				prctl(PR_SET_THP_DISABLE_, 0, 0, 0, 0);
			ret = madvise((void *)(uintptr_t)r.a[0], (size_t)r.a[1], (int)r.a[2])
				? neg_errno() : 0;
			break;
		case OP_PRCTL: {
			int v = prctl((int)r.a[0], (unsigned long)r.a[1], (unsigned long)r.a[2],
				      (unsigned long)r.a[3], (unsigned long)r.a[4]);

			ret = v < 0 ? neg_errno() : (int64_t)v;
			if (v >= 0 && (int)r.a[0] == PR_SET_MEMORY_MERGE_ && r.a[1] == 1)
				withdraw_own();
			break;
		}
		case OP_FORK:
			ret = do_fork(rfd);
			if (ret == INT64_MIN)
				continue;
			break;
		case OP_EXEC:
			ret = do_exec();
			break;
		case OP_EXIT:
			_exit(0);
		default:
			ret = -ENOSYS;
		}
		reply(ret);
	}
}
