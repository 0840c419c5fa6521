/*
 * damond.monitor.ops._page_idle: one sample of the page_idle access check, natively.
 *
 * page_idle.py is the reference: this module does exactly what its Python path
 * does (PageIdleAccess with native=False), for all sampled addresses of one
 * target in one call, so that a sample costs a handful of Python calls instead
 * of several dozen numpy calls and a Python loop step per region.
 *
 *   prepare(addrs, heads, pagemap_fd, kpageflags_fd, bitmap_fd, tails,
 *           pagemap_gap, kpageflags_gap, write_gap) -> int
 *     addrs: uint64 sampling addresses (virtual, or physical when pagemap_fd
 *     is -1); heads: a writable uint64 array of the same length, filled with
 *     the PFN whose idle bit stands for each address (its folio's head), or
 *     NO_HEAD where page_idle cannot tell (no page, not on an LRU list, no
 *     head found); tails: the dict of learned tail spans (head -> last tail,
 *     page_idle.HeadCache). Marks the heads idle. Returns how many addresses'
 *     pagemap entries were read (0: the fd holds an old address space, and
 *     nothing was marked), the number of addresses for physical ones, or
 *     PFN_HIDDEN when a present page shows no PFN (no CAP_SYS_ADMIN).
 *
 *   check(heads, accessed, bitmap_fd, read_gap) -> None
 *     accessed: a writable array of bytes (numpy bool) of the same length:
 *     1 where the head is trackable and no longer idle.
 *
 *   Sampler(kpageflags_fd, bitmap_fd, pagemap_fd, pidfd, tails, recover,
 *           pagemap_gap, kpageflags_gap, write_gap, read_gap, forget_every)
 *     A whole sample of one target, the engine's fast path (ops/base.py,
 *     TargetSampler): sampler.prepare(starts, ends, uniforms, offset) picks a
 *     page of each region as Regions.pick_sampling_addrs does from the uniforms
 *     at offset, and does prepare() above on them; sampler.check(nr_accesses)
 *     does check() and adds the answers into the regions' uint32 counters, in
 *     place. The sampler owns the fds it is given (closed by close() or when
 *     it goes); pagemap_fd and pidfd are -1 for physical addresses. What is
 *     not the common case is handed to recover(status), in Python: STALE
 *     (nothing read from the pagemap: the process exited or exec'd; recover
 *     returns a new pagemap fd to try once more, or raises), HIDDEN (PFNs
 *     hidden), MISSING (ESRCH/ENOENT from a file), EXITED (the pidfd says the
 *     process has exited, at check): recover raises for those.
 *
 * Reads and writes go to the kernel in runs, as page_idle.py's Layout does:
 * sorted unique positions share one pread/pwrite while they are at most
 * *_gap entries apart. The GIL is released around kernel I/O, except while
 * tails are walked (they use the dict).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ENTRY 8
#define WORD_PAGES 64
#define ALL_ONES UINT64_MAX
#define NO_HEAD UINT64_MAX
#define PFN_HIDDEN (-2)

/* DAMON's page (damond's PAGE_SIZE): sampling addresses are aligned to it */
#define SAMPLE_PAGE_SHIFT 12

/* what a Sampler hands to its recover() */
enum { STALE = 1, HIDDEN = 2, MISSING = 3, EXITED = 4 };

#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define KPF_LRU (1ULL << 5)
#define KPF_COMPOUND_HEAD (1ULL << 15)
#define KPF_COMPOUND_TAIL (1ULL << 16)
#define KPF_NOPAGE (1ULL << 20)

static uint64_t kernel_page;  /* sysconf(_SC_PAGESIZE) */
static uint64_t folio_block;  /* pages per PMD-sized block: kernel_page / ENTRY */

/* One position (file entry or bitmap word) and the input index it serves. */
typedef struct {
    uint64_t key;
    uint64_t value; /* what was read for it, or the bits to write */
    Py_ssize_t index;
} Item;

typedef struct {
    Item *items;
    uint64_t *flags;    /* kpageflags of each input, by index */
    Py_ssize_t cap;     /* room in items and flags */
    Py_ssize_t n;
    uint64_t *run;      /* scratch for one run's entries */
    Py_ssize_t run_cap;
    int err;            /* errno of a failed syscall, 0 if none */
} Work;

static int by_key(const void *a, const void *b)
{
    uint64_t x = ((const Item *)a)->key, y = ((const Item *)b)->key;
    return (x > y) - (x < y);
}

static void sort_items(Item *items, Py_ssize_t n)
{
    for (Py_ssize_t i = 1; i < n; i++) {
        if (items[i].key < items[i - 1].key) {
            qsort(items, (size_t)n, sizeof(Item), by_key);
            return;
        }
    }
}

/* *array resized to size bytes (kept as it was on failure): 0, or -1 when out of memory. */
static int grow_array(void **array, size_t size)
{
    void *grown = PyMem_RawRealloc(*array, size);
    if (grown == NULL)
        return -1;
    *array = grown;
    return 0;
}

/* Room for n items in each of count arrays (items of sizes[i] bytes) that hold *cap:
 * 0, or -1 when out of memory (*cap unchanged, the arrays still valid). */
static int grow_arrays(void **arrays[], const size_t sizes[], size_t count, Py_ssize_t *cap,
                       Py_ssize_t n)
{
    if (n <= *cap)
        return 0;
    for (size_t i = 0; i < count; i++) {
        if (grow_array(arrays[i], (size_t)n * sizes[i]) < 0)
            return -1;
    }
    *cap = n;
    return 0;
}

static int grow_run(Work *w, Py_ssize_t count)
{
    if (count <= w->run_cap)
        return 0;
    if (grow_array((void **)&w->run, (size_t)count * ENTRY) < 0) {
        w->err = ENOMEM;
        return -1;
    }
    w->run_cap = count;
    return 0;
}

/*
 * pread (or pwrite) count entries at entry offset first, on until the end of the
 * file: sysfs moves at most a page per call, and the kernel takes nothing of a
 * last, partial bitmap word. Returns the entries moved, or -1 (w->err set).
 */
static Py_ssize_t transfer(Work *w, int fd, uint64_t *buf, Py_ssize_t count, uint64_t first,
                           int writing)
{
    size_t size = (size_t)count * ENTRY, done = 0;
    char *p = (char *)buf;
    while (done < size) {
        off_t offset = (off_t)(first * ENTRY + done);
        ssize_t moved = writing ? pwrite(fd, p + done, size - done, offset)
                                : pread(fd, p + done, size - done, offset);
        if (moved < 0) {
            if (errno == EINTR)
                continue;
            w->err = errno;
            return -1;
        }
        if (moved == 0)
            break;
        done += (size_t)moved;
    }
    return (Py_ssize_t)(done / ENTRY);
}

/* Read count entries at entry offset first into buf; entries past the end of the
 * file read as fill. Returns the entries really read, or -1. */
static Py_ssize_t read_full(Work *w, int fd, uint64_t *buf, Py_ssize_t count, uint64_t first,
                            uint64_t fill)
{
    Py_ssize_t read = transfer(w, fd, buf, count, first, 0);
    for (Py_ssize_t i = read < 0 ? count : read; i < count; i++)
        buf[i] = fill;
    return read;
}

/* Where the run starting at item i ends (exclusive): sorted items at most max_gap
 * entries apart share one run, read or written by one call; *count is its length
 * in entries (the gaps included), made room for in w->run. -1 on ENOMEM. */
static Py_ssize_t run_end(Work *w, const Item *items, Py_ssize_t i, Py_ssize_t n,
                          uint64_t max_gap, Py_ssize_t *count)
{
    Py_ssize_t j = i + 1;
    while (j < n && items[j].key - items[j - 1].key <= max_gap + 1)
        j++;
    *count = (Py_ssize_t)(items[j - 1].key - items[i].key + 1);
    return grow_run(w, *count) < 0 ? -1 : j;
}

/*
 * Fill items[i].value with the entry at items[i].key of an array file; items
 * sorted by key (repeats allowed). Returns how many items got an entry read
 * from the file (not filled), or -1.
 */
static Py_ssize_t read_items(Work *w, int fd, Item *items, Py_ssize_t n, uint64_t max_gap,
                             uint64_t fill)
{
    Py_ssize_t read = 0, i = 0, count;
    while (i < n) {
        Py_ssize_t j = run_end(w, items, i, n, max_gap, &count);
        if (j < 0)
            return -1;
        uint64_t first = items[i].key;
        Py_ssize_t got = read_full(w, fd, w->run, count, first, fill);
        if (got < 0)
            return -1;
        for (Py_ssize_t k = i; k < j; k++) {
            uint64_t offset = items[k].key - first;
            items[k].value = w->run[offset];
            if ((Py_ssize_t)offset < got)
                read++;
        }
        i = j;
    }
    return read;
}

/* Write the OR of the values of equal keys at each key (sorted); close keys share
 * one pwrite, zero words in between. */
static int write_items(Work *w, int fd, const Item *items, Py_ssize_t n, uint64_t max_gap)
{
    Py_ssize_t i = 0, count;
    while (i < n) {
        Py_ssize_t j = run_end(w, items, i, n, max_gap, &count);
        if (j < 0)
            return -1;
        uint64_t first = items[i].key;
        memset(w->run, 0, (size_t)count * ENTRY);
        for (Py_ssize_t k = i; k < j; k++)
            w->run[items[k].key - first] |= items[k].value;
        if (transfer(w, fd, w->run, count, first, 1) < 0)
            return -1;
        i = j;
    }
    return 0;
}

/* -- tails and their heads (page_idle.py's HeadCache and find_head) ------------------------ */

static int cache_get(PyObject *tails, uint64_t head, uint64_t *last, int *found)
{
    PyObject *key = PyLong_FromUnsignedLongLong(head);
    if (key == NULL)
        return -1;
    PyObject *value = PyDict_GetItemWithError(tails, key);
    Py_DECREF(key);
    if (value == NULL) {
        *found = 0;
        return PyErr_Occurred() ? -1 : 0;
    }
    *last = PyLong_AsUnsignedLongLong(value);
    if (*last == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *found = 1;
    return 0;
}

static int cache_learn(PyObject *tails, uint64_t head, uint64_t last)
{
    uint64_t known;
    int found;
    if (cache_get(tails, head, &known, &found) < 0)
        return -1;
    if (found && known > last)
        last = known;
    PyObject *key = PyLong_FromUnsignedLongLong(head);
    PyObject *value = PyLong_FromUnsignedLongLong(last);
    int rc = (key && value) ? PyDict_SetItem(tails, key, value) : -1;
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc;
}

/* The nearest cached head that may hold pfn: its candidates are pfn rounded down to
 * each folio order, nearest first. */
static int cache_nearest(PyObject *tails, uint64_t pfn, uint64_t *head, uint64_t *last, int *found)
{
    uint64_t previous = pfn;
    *found = 0;
    for (uint64_t size = 2; size <= folio_block; size *= 2) {
        uint64_t candidate = pfn & ~(size - 1);
        if (candidate == pfn || candidate == previous)
            continue;
        previous = candidate;
        if (cache_get(tails, candidate, last, found) < 0)
            return -1;
        if (*found) {
            *head = candidate;
            return 0;
        }
    }
    return 0;
}

/* The head PFN of the tail page pfn, or NO_HEAD; -1 on error (Python error or w->err). */
static int find_head(Work *w, int kpageflags, PyObject *tails, uint64_t pfn, uint64_t *out)
{
    uint64_t known_head = 0, known_last = 0;
    int known;
    *out = NO_HEAD;
    if (cache_nearest(tails, pfn, &known_head, &known_last, &known) < 0)
        return -1;
    if (known && pfn <= known_last) {
        *out = known_head;
        return 0;
    }
    uint64_t first = known ? known_last + 1 : pfn & ~(folio_block - 1);
    Py_ssize_t count = (Py_ssize_t)(pfn - first);
    if (grow_run(w, count ? count : 1) < 0)
        return -1;
    Py_ssize_t got = read_full(w, kpageflags, w->run, count, first, 0);
    if (got < 0)
        return -1;
    if (got < count)
        return 0;
    Py_ssize_t last_not_tail = -1;
    for (Py_ssize_t k = count - 1; k >= 0; k--) {
        if (!(w->run[k] & KPF_COMPOUND_TAIL)) {
            last_not_tail = k;
            break;
        }
    }
    uint64_t head = NO_HEAD;
    if (known && last_not_tail < 0)
        head = known_head;
    else if (last_not_tail >= 0 && (w->run[last_not_tail] & KPF_COMPOUND_HEAD))
        head = first + (uint64_t)last_not_tail;
    if (head != NO_HEAD && cache_learn(tails, head, pfn) < 0)
        return -1;
    *out = head;
    return 0;
}

/* -- scratch memory --------------------------------------------------------------------------- */

/* Room for n inputs in w (kept between calls by a Sampler). -1 on ENOMEM, w->err set. */
static int work_reserve(Work *w, Py_ssize_t n)
{
    void **arrays[] = {(void **)&w->items, (void **)&w->flags};
    const size_t sizes[] = {sizeof(Item), sizeof(uint64_t)};
    if (grow_arrays(arrays, sizes, 2, &w->cap, n) < 0) {
        w->err = ENOMEM;
        return -1;
    }
    return 0;
}

static void work_free(Work *w)
{
    PyMem_RawFree(w->items);
    PyMem_RawFree(w->flags);
    PyMem_RawFree(w->run);
    memset(w, 0, sizeof(*w));
}

static PyObject *raise_work(Work *w)
{
    if (!PyErr_Occurred()) {
        errno = w->err;
        if (w->err == ENOMEM)
            return PyErr_NoMemory();
        PyErr_SetFromErrno(PyExc_OSError);
    }
    return NULL;
}

/* -- one sample: what both entry points do ------------------------------------------------------ */

typedef struct {
    int pagemap;    /* -1: the addresses are physical */
    int kpageflags;
    int bitmap;
    unsigned long long pagemap_gap, kpageflags_gap, write_gap, read_gap;
} Files;

/* pagemap entries of the sorted items -> PFNs (0: no page). Returns entries read or PFN_HIDDEN. */
static Py_ssize_t translate(Work *w, int pagemap, uint64_t max_gap)
{
    for (Py_ssize_t i = 0; i < w->n; i++)
        w->items[i].key /= kernel_page;
    Py_ssize_t read = read_items(w, pagemap, w->items, w->n, max_gap, ALL_ONES);
    if (read <= 0)
        return read;
    for (Py_ssize_t i = 0; i < w->n; i++) {
        uint64_t entry = w->items[i].value;
        if (entry == ALL_ONES || !(entry & PM_PRESENT)) {
            w->items[i].key = 0;
            continue;
        }
        if ((entry & PM_PFN_MASK) == 0)
            return PFN_HIDDEN;
        w->items[i].key = entry & PM_PFN_MASK;
    }
    return read;
}

/*
 * prepare() for n addresses: heads into out, the heads marked idle. Returns what
 * prepare() returns, or -1 on an error (a Python error set, or w->err). The GIL is
 * held on entry and on return.
 */
static Py_ssize_t prepare_sample(Work *w, const Files *f, PyObject *tails, const uint64_t *in,
                                 uint64_t *out, Py_ssize_t n)
{
    if (work_reserve(w, n ? n : 1) < 0)
        return -1;
    w->n = n;
    Py_ssize_t read = n;

    /* PFNs (as keys, sorted), then their flags (as values) */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        w->items[i].key = in[i];
        w->items[i].index = i;
    }
    sort_items(w->items, n);
    if (f->pagemap >= 0) {
        read = translate(w, f->pagemap, f->pagemap_gap);
        sort_items(w->items, n);
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            w->items[i].key /= kernel_page;
    }
    if (read > 0) {
        Py_ssize_t first = 0;
        while (first < n && w->items[first].key == 0)
            w->items[first++].value = KPF_NOPAGE;
        if (read_items(w, f->kpageflags, w->items + first, n - first, f->kpageflags_gap,
                       KPF_NOPAGE) < 0)
            read = -1;
    }
    Py_END_ALLOW_THREADS
    if (read == -1)
        return -1;
    if (read == 0 || read == PFN_HIDDEN) {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = NO_HEAD;
        return read;
    }

    /* heads: a trackable page stands for itself, a tail for its head (walked in
     * address order, as the Python path learns tails) */
    for (Py_ssize_t i = 0; i < n; i++) {
        const Item *it = &w->items[i];
        w->flags[it->index] = it->value;
        out[it->index] = it->key != 0 && (it->value & KPF_LRU) ? it->key : NO_HEAD;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (out[i] == NO_HEAD || !(w->flags[i] & KPF_COMPOUND_TAIL))
            continue;
        if (find_head(w, f->kpageflags, tails, out[i], &out[i]) < 0)
            return -1;
    }

    /* mark the heads idle: one word per 64 pages, the OR of its sampled bits */
    int failed;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (out[i] == NO_HEAD)
            continue;
        w->items[m].key = out[i] / WORD_PAGES;
        w->items[m].value = 1ULL << (out[i] % WORD_PAGES);
        m++;
    }
    sort_items(w->items, m);
    failed = write_items(w, f->bitmap, w->items, m, f->write_gap) < 0;
    Py_END_ALLOW_THREADS
    return failed ? -1 : read;
}

/* check() for n heads: 1 in out where the head is trackable and no longer idle.
 * 0, or -1 with w->err set. The GIL is released. */
static int check_sample(Work *w, const Files *f, const uint64_t *in, unsigned char *out,
                        Py_ssize_t n)
{
    if (work_reserve(w, n ? n : 1) < 0)
        return -1;
    Py_ssize_t read;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = 0;
        if (in[i] == NO_HEAD)
            continue;
        w->items[m].key = in[i] / WORD_PAGES;
        w->items[m].index = i;
        m++;
    }
    sort_items(w->items, m);
    read = read_items(w, f->bitmap, w->items, m, f->read_gap, ALL_ONES);
    if (read >= 0) {
        for (Py_ssize_t k = 0; k < m; k++) {
            Py_ssize_t i = w->items[k].index;
            out[i] = !((w->items[k].value >> (in[i] % WORD_PAGES)) & 1);
        }
    }
    Py_END_ALLOW_THREADS
    return read < 0 ? -1 : 0;
}

/* -- the module's functions: one sample of given addresses ------------------------------------- */

static int views_match(Py_buffer *a, Py_buffer *b, const char *what)
{
    if (a->len % ENTRY || b->len != a->len) {
        PyErr_Format(PyExc_ValueError, "%s: %zd and %zd bytes, want equal multiples of 8", what,
                     a->len, b->len);
        return -1;
    }
    return 0;
}

static PyObject *prepare(PyObject *self, PyObject *args)
{
    Py_buffer addrs, heads;
    Files f = {0};
    PyObject *tails;
    if (!PyArg_ParseTuple(args, "y*w*iiiO!KKK:prepare", &addrs, &heads, &f.pagemap,
                          &f.kpageflags, &f.bitmap, &PyDict_Type, &tails, &f.pagemap_gap,
                          &f.kpageflags_gap, &f.write_gap))
        return NULL;
    PyObject *result = NULL;
    Work w = {0};
    if (views_match(&addrs, &heads, "prepare: addrs and heads") == 0) {
        Py_ssize_t read =
            prepare_sample(&w, &f, tails, addrs.buf, heads.buf, addrs.len / ENTRY);
        result = read == -1 ? raise_work(&w) : PyLong_FromSsize_t(read);
    }
    work_free(&w);
    PyBuffer_Release(&addrs);
    PyBuffer_Release(&heads);
    return result;
}

static PyObject *check(PyObject *self, PyObject *args)
{
    Py_buffer heads, accessed;
    Files f = {0};
    if (!PyArg_ParseTuple(args, "y*w*iK:check", &heads, &accessed, &f.bitmap, &f.read_gap))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = heads.len / ENTRY;
    if (heads.len % ENTRY || accessed.len != n) {
        PyErr_Format(PyExc_ValueError, "check: %zd bytes of heads and %zd answers", heads.len,
                     accessed.len);
    } else {
        Work w = {0};
        result = check_sample(&w, &f, heads.buf, accessed.buf, n) < 0 ? raise_work(&w)
                                                                      : Py_NewRef(Py_None);
        work_free(&w);
    }
    PyBuffer_Release(&heads);
    PyBuffer_Release(&accessed);
    return result;
}

/* -- Sampler: a whole sample of one target's regions -------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Files files;
    int pidfd;               /* -1: no process (physical addresses) */
    PyObject *tails;         /* head -> last known tail (dict), this target's */
    PyObject *recover;       /* recover(status) -> a new pagemap fd, or raises */
    unsigned long long forget_every, prepares;
    Work work;
    uint64_t *addrs, *heads; /* of the last prepare */
    unsigned char *accessed;
    Py_ssize_t cap;          /* room in addrs, heads, accessed */
    Py_ssize_t marked;       /* addresses of the last prepare */
    int pending;             /* a prepare waits for its check */
} Sampler;

static void sampler_close_fds(Sampler *s)
{
    int *fds[] = {&s->files.pagemap, &s->files.kpageflags, &s->files.bitmap, &s->pidfd};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static int sampler_init(Sampler *s, PyObject *args, PyObject *kwds)
{
    PyObject *tails, *recover;
    Files f = {0};
    int pidfd;
    unsigned long long forget_every;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Sampler() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "iiiiO!OKKKKK:Sampler", &f.kpageflags, &f.bitmap, &f.pagemap,
                          &pidfd, &PyDict_Type, &tails, &recover, &f.pagemap_gap,
                          &f.kpageflags_gap, &f.write_gap, &f.read_gap, &forget_every))
        return -1;
    if (!PyCallable_Check(recover)) {
        PyErr_SetString(PyExc_TypeError, "Sampler: recover must be callable");
        return -1;
    }
    sampler_close_fds(s);
    s->files = f;
    s->pidfd = pidfd;
    Py_XSETREF(s->tails, Py_NewRef(tails));
    Py_XSETREF(s->recover, Py_NewRef(recover));
    s->forget_every = forget_every;
    s->prepares = 0;
    s->marked = 0;
    s->pending = 0;
    return 0;
}

static PyObject *sampler_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Sampler *s = (Sampler *)type->tp_alloc(type, 0);
    if (s != NULL) {
        s->files.pagemap = s->files.kpageflags = s->files.bitmap = s->pidfd = -1;
    }
    return (PyObject *)s;
}

static int sampler_traverse(Sampler *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->tails);
    Py_VISIT(s->recover);
    return 0;
}

static int sampler_clear(Sampler *s)
{
    Py_CLEAR(s->tails);
    Py_CLEAR(s->recover);
    return 0;
}

static void sampler_dealloc(Sampler *s)
{
    PyTypeObject *type = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    sampler_close_fds(s);
    sampler_clear(s);
    work_free(&s->work);
    PyMem_RawFree(s->addrs);
    PyMem_RawFree(s->heads);
    PyMem_RawFree(s->accessed);
    type->tp_free((PyObject *)s);
    Py_DECREF(type);
}

/* A C-contiguous buffer of one-letter format among formats, itemsize bytes each. */
static int get_view(PyObject *obj, Py_buffer *view, int flags, const char *formats,
                    Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    if (*format == '<' || *format == '=' || *format == '@')
        format++;
    if (view->itemsize != itemsize || format[0] == '\0' || format[1] != '\0' ||
        strchr(formats, format[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: want a contiguous array of %zd-byte items of "
                     "format %s, not %s", what, itemsize, formats, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int sampler_reserve(Sampler *s, Py_ssize_t n)
{
    void **arrays[] = {(void **)&s->addrs, (void **)&s->heads, (void **)&s->accessed};
    const size_t sizes[] = {sizeof(uint64_t), sizeof(uint64_t), 1};
    if (grow_arrays(arrays, sizes, 3, &s->cap, n) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* recover(status): a new pagemap fd (STALE), or the error it raised (-1). */
static int sampler_recover(Sampler *s, int status)
{
    PyObject *result = PyObject_CallFunction(s->recover, "i", status);
    if (result == NULL)
        return -1;
    int fd = -1;
    if (status == STALE && PyLong_Check(result)) {
        long value = PyLong_AsLong(result);
        if (value < 0 || value > INT_MAX) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "page_idle: recover() gave fd %ld", value);
        } else {
            fd = (int)value;
        }
    } else if (!PyErr_Occurred())
        PyErr_Format(PyExc_RuntimeError, "page_idle: recover(%d) returned instead of raising",
                     status);
    Py_DECREF(result);
    return PyErr_Occurred() ? -1 : fd;
}

/* prepare_sample with the Python path's recovery (page_idle.py, PageIdleAccess._prepare_virtual):
 * a pagemap that reads nothing is opened again once, errors that say the process has gone
 * are recover()'s to raise. 0, or -1 with an error set. */
static int sampler_mark(Sampler *s, Py_ssize_t n)
{
    int retried = 0;
    for (;;) {
        Py_ssize_t read = prepare_sample(&s->work, &s->files, s->tails, s->addrs, s->heads, n);
        if (read == -1) {
            if (PyErr_Occurred())
                return -1;
            int err = s->work.err;
            s->work.err = 0;
            if (s->files.pagemap >= 0 && (err == ESRCH || err == ENOENT))
                return sampler_recover(s, MISSING) < 0 ? -1 : 0;
            errno = err;
            if (err == ENOMEM)
                PyErr_NoMemory();
            else
                PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (read == 0 && n && s->files.pagemap >= 0 && !retried) {
            int fd = sampler_recover(s, STALE);
            if (fd < 0)
                return -1;
            close(s->files.pagemap);
            s->files.pagemap = fd;
            retried = 1;
            continue;
        }
        if (read == PFN_HIDDEN)
            return sampler_recover(s, HIDDEN) < 0 ? -1 : 0;
        return 0;
    }
}

static PyObject *sampler_prepare(Sampler *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "prepare() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[3]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (s->files.bitmap < 0) {
        PyErr_SetString(PyExc_ValueError, "prepare() of a closed Sampler");
        return NULL;
    }
    Py_buffer starts, ends, uniforms;
    if (get_view(args[0], &starts, PyBUF_SIMPLE, "LQ", 8, "prepare: starts") < 0)
        return NULL;
    PyObject *result = NULL;
    if (get_view(args[1], &ends, PyBUF_SIMPLE, "LQ", 8, "prepare: ends") < 0)
        goto release_starts;
    if (get_view(args[2], &uniforms, PyBUF_SIMPLE, "d", 8, "prepare: uniforms") < 0)
        goto release_ends;
    Py_ssize_t n = starts.len / ENTRY;
    if (ends.len != starts.len || offset < 0 || offset > uniforms.len / ENTRY - n) {
        PyErr_Format(PyExc_ValueError, "prepare: %zd starts, %zd ends, uniforms %zd to %zd of %zd",
                     n, ends.len / ENTRY, offset, offset + n, uniforms.len / ENTRY);
        goto release;
    }
    if (sampler_reserve(s, n ? n : 1) < 0)
        goto release;

    /* Regions.pick_sampling_addrs: a page of each region, damon_rand(start, end) aligned */
    const uint64_t *lo = starts.buf, *hi = ends.buf;
    const double *u = (const double *)uniforms.buf + offset;
    for (Py_ssize_t i = 0; i < n; i++) {
        double pages = nextafter((double)((hi[i] - lo[i]) >> SAMPLE_PAGE_SHIFT), 0.0);
        s->addrs[i] = lo[i] + ((uint64_t)(u[i] * pages) << SAMPLE_PAGE_SHIFT);
    }
    s->marked = n;
    s->pending = 0;
    if (s->forget_every && ++s->prepares % s->forget_every == 0 && PyDict_GET_SIZE(s->tails))
        PyDict_Clear(s->tails);
    if (sampler_mark(s, n) == 0) {
        s->pending = 1;
        result = Py_NewRef(Py_None);
    }
release:
    PyBuffer_Release(&uniforms);
release_ends:
    PyBuffer_Release(&ends);
release_starts:
    PyBuffer_Release(&starts);
    return result;
}

static PyObject *sampler_check(Sampler *s, PyObject *nr_accesses)
{
    if (!s->pending) {
        PyErr_SetString(PyExc_RuntimeError, "check() without a prepare() since the last check");
        return NULL;
    }
    Py_buffer nr;
    if (get_view(nr_accesses, &nr, PyBUF_WRITABLE, "I", 4, "check: nr_accesses") < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = nr.len / 4;
    if (n != s->marked) {
        PyErr_Format(PyExc_ValueError, "check: %zd regions, %zd prepared", n, s->marked);
        goto release;
    }
    s->pending = 0;
    if (s->pidfd >= 0) { /* as the Python path's check: an exited target is gone */
        struct pollfd exited = {.fd = s->pidfd, .events = POLLIN};
        if (poll(&exited, 1, 0) > 0) {
            sampler_recover(s, EXITED);
            goto release;
        }
    }
    if (check_sample(&s->work, &s->files, s->heads, s->accessed, n) < 0) {
        raise_work(&s->work);
        s->work.err = 0;
        goto release;
    }
    uint32_t *counts = nr.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        counts[i] += s->accessed[i];
    result = Py_NewRef(Py_None);
release:
    PyBuffer_Release(&nr);
    return result;
}

static PyObject *sampler_marked(Sampler *s, PyObject *unused)
{
    Py_ssize_t size = s->marked * (Py_ssize_t)sizeof(uint64_t);
    return Py_BuildValue("(y#y#)", (const char *)s->addrs, size, (const char *)s->heads, size);
}

static PyObject *sampler_close(Sampler *s, PyObject *unused)
{
    sampler_close_fds(s);
    s->pending = 0;
    Py_RETURN_NONE;
}

static PyMethodDef sampler_methods[] = {
    {"prepare", (PyCFunction)(void (*)(void))sampler_prepare, METH_FASTCALL,
     "prepare(starts, ends, uniforms, offset): pick a page of each region from "
     "uniforms[offset:offset + len(starts)], mark it idle."},
    {"check", (PyCFunction)sampler_check, METH_O,
     "check(nr_accesses): add 1 to the uint32 count of each region whose page was accessed."},
    {"marked", (PyCFunction)sampler_marked, METH_NOARGS,
     "marked() -> (addrs, heads): the last prepare's addresses and heads, as uint64 bytes."},
    {"close", (PyCFunction)sampler_close, METH_NOARGS, "close(): release the fds."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot sampler_slots[] = {
    {Py_tp_doc, "Sampler(kpageflags_fd, bitmap_fd, pagemap_fd, pidfd, tails, recover, "
                "pagemap_gap, kpageflags_gap, write_gap, read_gap, forget_every): a whole "
                "sample of one target's regions per call (it owns the fds)."},
    {Py_tp_new, sampler_new},
    {Py_tp_init, sampler_init},
    {Py_tp_dealloc, sampler_dealloc},
    {Py_tp_traverse, sampler_traverse},
    {Py_tp_clear, sampler_clear},
    {Py_tp_methods, sampler_methods},
    {0, NULL},
};

static PyType_Spec sampler_spec = {
    .name = "damond.monitor.ops._page_idle.Sampler",
    .basicsize = sizeof(Sampler),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = sampler_slots,
};

/* -- the module ----------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"prepare", prepare, METH_VARARGS,
     "prepare(addrs, heads, pagemap_fd, kpageflags_fd, bitmap_fd, tails, pagemap_gap, "
     "kpageflags_gap, write_gap) -> pagemap entries read: mark the sampled pages idle."},
    {"check", check, METH_VARARGS,
     "check(heads, accessed, bitmap_fd, read_gap): which marked pages were accessed since."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_page_idle",
    .m_doc = "One sample of the page_idle access check in one call (page_idle.py is the "
             "reference).",
    .m_size = -1,
    .m_methods = methods,
};

static int add_u64(PyObject *m, const char *name, uint64_t value)
{
    PyObject *number = PyLong_FromUnsignedLongLong(value);
    int rc = number ? PyModule_AddObject(m, name, number) : -1;
    if (rc < 0)
        Py_XDECREF(number);
    return rc;
}

PyMODINIT_FUNC PyInit__page_idle(void)
{
    long page = sysconf(_SC_PAGESIZE);
    kernel_page = page > 0 ? (uint64_t)page : 4096;
    folio_block = kernel_page / ENTRY;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *sampler = PyType_FromSpec(&sampler_spec);
    if (sampler == NULL || PyModule_AddObject(m, "Sampler", sampler) < 0) {
        Py_XDECREF(sampler);
        Py_DECREF(m);
        return NULL;
    }
    if (add_u64(m, "NO_HEAD", NO_HEAD) < 0 || add_u64(m, "KPF_LRU", KPF_LRU) < 0 ||
        PyModule_AddIntConstant(m, "PFN_HIDDEN", PFN_HIDDEN) < 0 ||
        add_u64(m, "KPF_COMPOUND_HEAD", KPF_COMPOUND_HEAD) < 0 ||
        add_u64(m, "KPF_COMPOUND_TAIL", KPF_COMPOUND_TAIL) < 0 ||
        add_u64(m, "KPF_NOPAGE", KPF_NOPAGE) < 0 ||
        PyModule_AddIntConstant(m, "KERNEL_PAGE", (long)kernel_page) < 0 ||
        PyModule_AddIntConstant(m, "SAMPLE_PAGE", 1L << SAMPLE_PAGE_SHIFT) < 0 ||
        PyModule_AddIntConstant(m, "STALE", STALE) < 0 ||
        PyModule_AddIntConstant(m, "HIDDEN", HIDDEN) < 0 ||
        PyModule_AddIntConstant(m, "MISSING", MISSING) < 0 ||
        PyModule_AddIntConstant(m, "EXITED", EXITED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
