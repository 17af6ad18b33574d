package spool

import (
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/mtaproject/mta/mta"
)

// Body files keep the bytes of large messages outside Pebble, in
// append-only files under <spool>/bodies. In Pebble a 100 KB body is
// written to the WAL, then, because it is usually still queued when its
// memtable fills, to a table, and again by every compaction that carries
// it down, only to be deleted a second later. A body file is written once,
// read once per attempt, and removed whole when none of its bodies is
// still needed.
//
// Durability follows from the order of writes: a body is written and its
// file synced before the record that points to it is committed (and
// synced), so a record that survives a crash always finds its bytes. A
// body whose record never committed is garbage that goes with its file. A
// file is removed only after a WAL sync that follows the last commit
// releasing it, so no crash can bring back a record whose file is gone.

// bodyFileSize is the size at which the active body file is sealed and a
// new one begun: smaller files free space sooner, larger ones mean fewer
// files and directory syncs. On a small volume it is at most a 64th of it.
// The active file is also sealed once all its bodies are done and it holds
// an eighth of this, so that a drained queue gives its space back.
const bodyFileSize = 32 << 20

// sparseFileAge and sparseFileCheck: a sealed file older than
// sparseFileAge whose live bodies fill less than half of it is emptied, its
// bodies moved into Pebble, checked every sparseFileCheck. Mail that waits
// (a destination backed off, a long queue to one domain) then does not keep
// a file of mostly delivered bodies on disk. Tests shorten them.
var (
	sparseFileAge   = 10 * time.Minute
	sparseFileCheck = time.Minute
)

// bodyFilesDir is the directory of body files inside the spool's.
const bodyFilesDir = "bodies"

const bodyFileExt = ".body"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// bodyLocation says where the bytes of a message are: the zero value means
// under b/<id> in Pebble; otherwise in body file File at Offset, the
// message's Size bytes, with CRC their CRC-32C.
type bodyLocation struct {
	File   uint64
	Offset int64
	CRC    uint32
}

// errBodyFileGone is what a read of a file that was removed meanwhile
// returns: the message was relocated or finished between the record read
// and the body read.
var errBodyFileGone = errors.New("spool: body file removed")

// bodyFile is one file of bodies.
type bodyFile struct {
	num       uint64
	f         *os.File
	created   time.Time
	size      int64 // bytes written, and the offset of the next body
	live      int   // bodies that records point to, or will once committed
	liveBytes int64 // their bytes
	sealed    bool  // takes no more bodies; removable once live is 0
	dirty     bool  // written since its last sync
	// pinned keeps the file whatever its live count: recovery found a
	// record it could not read, which may point here.
	pinned bool
	// unmovable: moving one of its bodies into Pebble failed (a damaged
	// body), so the sparse pass leaves the file alone.
	unmovable bool
}

// bodyFiles is the set of body files. Appends are serialised; reads of
// different bodies run in parallel.
type bodyFiles struct {
	dir     string
	durable bool  // fsync files and the directory (Options.Sync)
	limit   int64 // bodyFileSize, or less in tests
	// A sealed file older than sparseAge whose live bodies fill less than
	// half of it is emptied: those bodies move into Pebble, every
	// sparseCheck.
	sparseAge, sparseCheck time.Duration

	// readMu is held for reading by reads and syncs, which use a file
	// outside mu, and for writing while files are closed.
	readMu sync.RWMutex
	mu     sync.Mutex // guards the fields below, and the active file's writes
	files  map[uint64]*bodyFile
	active *bodyFile
	next   uint64      // number of the next file
	dirty  []*bodyFile // files written since the last sync
	// uncounted are the locations of records that recovery could not
	// count (their file missing or short): releasing one changes no count.
	uncounted map[bodyLocation]bool

	syncs     groupSync
	syncCount atomic.Int64  // fdatasync calls on body files
	wake      chan struct{} // a sealed file may have become removable
}

// openBodyFiles opens the body files in dir/bodies, creating the directory
// if needed. Every file found is sealed: new bodies go to a new file. Their
// live counts are zero until recovery counts them (count).
func openBodyFiles(dir string, durable bool) (*bodyFiles, error) {
	bf := &bodyFiles{dir: filepath.Join(dir, bodyFilesDir), durable: durable, limit: int64(volumeShare(dir, bodyFileSize, 1<<20)),
		sparseAge: sparseFileAge, sparseCheck: sparseFileCheck, files: map[uint64]*bodyFile{}, next: 1, wake: make(chan struct{}, 1),
		uncounted: map[bodyLocation]bool{}}
	bf.syncs.cond = sync.NewCond(&bf.syncs.mu)
	if _, err := os.Stat(bf.dir); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(bf.dir, 0o750); err != nil {
			return nil, fmt.Errorf("spool: %w", err)
		}
		if durable { // the files' names will be synced in it, and it in the spool's
			if err := syncDir(dir); err != nil {
				return nil, fmt.Errorf("spool: %w", err)
			}
		}
	}
	entries, err := os.ReadDir(bf.dir)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	for _, e := range entries {
		num, ok := parseBodyFileName(e.Name())
		if !ok {
			continue
		}
		f, err := os.Open(filepath.Join(bf.dir, e.Name())) // sealed: only read
		if err != nil {
			bf.closeAll()
			return nil, fmt.Errorf("spool: %w", err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			bf.closeAll()
			return nil, fmt.Errorf("spool: %w", err)
		}
		bf.files[num] = &bodyFile{num: num, f: f, created: st.ModTime(), size: st.Size(), sealed: true}
		bf.next = max(bf.next, num+1)
	}
	return bf, nil
}

func bodyFileName(num uint64) string { return fmt.Sprintf("%016x%s", num, bodyFileExt) }

func parseBodyFileName(name string) (uint64, bool) {
	hex, ok := strings.CutSuffix(name, bodyFileExt)
	if !ok || len(hex) != 16 {
		return 0, false
	}
	n, err := strconv.ParseUint(hex, 16, 64)
	return n, err == nil && n > 0
}

// count notes, during recovery, that a record points to loc, a body of size
// bytes. It reports false if the file is missing or too short to hold it;
// the location is then remembered as uncounted. Either way no new file
// takes the number the record names.
func (bf *bodyFiles) count(loc bodyLocation, size int64) bool {
	bf.next = max(bf.next, loc.File+1)
	f := bf.files[loc.File]
	if f == nil || !fits(loc, size, f.size) {
		bf.uncounted[loc] = true
		return false
	}
	f.live++
	f.liveBytes += size
	return true
}

// fits reports whether size bytes at loc lie within a file of fileSize.
func fits(loc bodyLocation, size, fileSize int64) bool {
	return loc.Offset >= 0 && size >= 0 && loc.Offset <= fileSize && size <= fileSize-loc.Offset
}

// pinAll keeps every file there is now for as long as the spool is open.
func (bf *bodyFiles) pinAll() {
	for _, f := range bf.files {
		f.pinned = true
	}
}

// append writes header followed by body to the active file and returns
// where. The caller syncs (syncAll) before it commits a record pointing
// there, and releases the location if that commit fails.
func (bf *bodyFiles) append(header, body []byte) (bodyLocation, error) {
	crc := crc32.Update(crc32.Checksum(header, castagnoli), castagnoli, body)
	bf.mu.Lock()
	defer bf.mu.Unlock()
	a := bf.active
	if a == nil || a.size >= bf.limit {
		if a != nil {
			bf.seal(a)
		}
		var err error
		if a, err = bf.create(); err != nil {
			return bodyLocation{}, err
		}
	}
	off := a.size
	if err := pwriteAll(a.f, [][]byte{header, body}, off); err != nil {
		// What was written of it is garbage; nothing more goes after it.
		a.size = off + int64(len(header)+len(body))
		bf.seal(a)
		return bodyLocation{}, bodyFileError("writing", err)
	}
	a.size = off + int64(len(header)+len(body))
	a.live++
	a.liveBytes += int64(len(header) + len(body))
	if bf.durable && !a.dirty {
		a.dirty = true
		bf.dirty = append(bf.dirty, a)
	}
	return bodyLocation{File: a.num, Offset: off, CRC: crc}, nil
}

// create begins a new active file. With sync, the directory is synced too,
// so that the file's name survives a crash along with the records that
// will point into it. It runs under mu.
func (bf *bodyFiles) create() (*bodyFile, error) {
	num := bf.next
	f, err := os.OpenFile(filepath.Join(bf.dir, bodyFileName(num)), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return nil, bodyFileError("creating", err)
	}
	if bf.durable {
		if err := syncDir(bf.dir); err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, bodyFileError("syncing the directory of", err)
		}
	}
	bf.next++
	a := &bodyFile{num: num, f: f, created: time.Now()}
	bf.files[num] = a
	bf.active = a
	return a, nil
}

// seal stops appends to a, under mu.
func (bf *bodyFiles) seal(a *bodyFile) {
	a.sealed = true
	if bf.active == a {
		bf.active = nil
	}
	if a.live == 0 {
		bf.poke()
	}
}

func (bf *bodyFiles) poke() {
	select {
	case bf.wake <- struct{}{}:
	default:
	}
}

// syncAll returns once every body written before the call is on disk. Calls
// that come while a sync runs share the next one.
func (bf *bodyFiles) syncAll() error {
	return bf.syncs.wait(func() error {
		bf.readMu.RLock() // the files synced stay open
		defer bf.readMu.RUnlock()
		// A write from now on marks its file for the next sync.
		bf.mu.Lock()
		dirty := bf.dirty
		bf.dirty = nil
		for _, f := range dirty {
			f.dirty = false
		}
		bf.mu.Unlock()
		for _, f := range dirty {
			bf.syncCount.Add(1)
			if err := unix.Fdatasync(int(f.f.Fd())); err != nil {
				// Even ENOSPC: what was not written may be lost from the
				// page cache, so the spool must stop (see breakOn).
				return fmt.Errorf("spool: syncing a body file: %w", err)
			}
		}
		return nil
	})
}

// read appends the size bytes at loc to dst and checks their checksum.
func (bf *bodyFiles) read(dst []byte, loc bodyLocation, size int64) ([]byte, error) {
	bf.readMu.RLock()
	defer bf.readMu.RUnlock()
	bf.mu.Lock()
	f := bf.files[loc.File]
	var fileSize int64
	if f != nil {
		fileSize = f.size
	}
	bf.mu.Unlock()
	if f == nil {
		return dst, errBodyFileGone
	}
	if !fits(loc, size, fileSize) {
		return dst, fmt.Errorf("spool: body file %s: %d bytes at %d are beyond its end (%d bytes)", bodyFileName(loc.File), size, loc.Offset, fileSize)
	}
	start := len(dst)
	out := slices.Grow(dst, int(size))[:start+int(size)]
	if _, err := f.f.ReadAt(out[start:], loc.Offset); err != nil {
		return dst, bodyFileError("reading", err)
	}
	if crc32.Checksum(out[start:], castagnoli) != loc.CRC {
		return dst, fmt.Errorf("spool: body file %s: %d bytes at %d fail their checksum", bodyFileName(loc.File), size, loc.Offset)
	}
	return out, nil
}

// release notes that no record points to loc, a body of size bytes, any
// more: its commit (a removal, or a move into Pebble) has returned.
func (bf *bodyFiles) release(loc bodyLocation, size int64) {
	if loc.File == 0 {
		return
	}
	bf.mu.Lock()
	defer bf.mu.Unlock()
	if bf.uncounted[loc] {
		delete(bf.uncounted, loc)
		return
	}
	f := bf.files[loc.File]
	if f == nil {
		return
	}
	f.live--
	f.liveBytes -= size
	if f.live <= 0 && f == bf.active && f.size >= bf.limit/8 {
		bf.seal(f)
	} else if f.live <= 0 && f.sealed {
		bf.poke()
	}
}

// sealIfUnused seals the active file if none of its bodies is needed any
// more, whatever its size, so that its space comes back: the spool calls
// it when it is short of space.
func (bf *bodyFiles) sealIfUnused() {
	bf.mu.Lock()
	defer bf.mu.Unlock()
	if a := bf.active; a != nil && a.live <= 0 {
		bf.seal(a)
	}
}

// removable returns the sealed files that no record points to.
func (bf *bodyFiles) removable() []uint64 {
	bf.mu.Lock()
	defer bf.mu.Unlock()
	var out []uint64
	for num, f := range bf.files {
		if f.removable() {
			out = append(out, num)
		}
	}
	return out
}

func (f *bodyFile) removable() bool { return f.sealed && f.live <= 0 && !f.pinned }

// remove closes and deletes the given files, if they are still removable.
// The caller has made every commit that released them durable.
func (bf *bodyFiles) remove(nums []uint64) error {
	bf.readMu.Lock()
	bf.mu.Lock()
	var gone []*bodyFile
	for _, num := range nums {
		if f := bf.files[num]; f != nil && f.removable() {
			// Its bytes are nobody's: a sync they wait for is not needed.
			delete(bf.files, num)
			bf.dirty = slices.DeleteFunc(bf.dirty, func(d *bodyFile) bool { return d == f })
			gone = append(gone, f)
		}
	}
	bf.mu.Unlock()
	bf.readMu.Unlock()
	var errs []error
	for _, f := range gone {
		f.f.Close()
		if err := os.Remove(f.f.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// markUnmovable keeps the sparse pass away from file num.
func (bf *bodyFiles) markUnmovable(num uint64) {
	bf.mu.Lock()
	defer bf.mu.Unlock()
	if f := bf.files[num]; f != nil {
		f.unmovable = true
	}
}

// sparse returns the sealed files older than sparseAge with live bodies
// that fill less than half of them.
func (bf *bodyFiles) sparse(now time.Time) map[uint64]bool {
	bf.mu.Lock()
	defer bf.mu.Unlock()
	out := map[uint64]bool{}
	for num, f := range bf.files {
		if f.sealed && f.live > 0 && !f.unmovable && !f.pinned && now.Sub(f.created) >= bf.sparseAge && 2*f.liveBytes < f.size {
			out[num] = true
		}
	}
	return out
}

// stats returns how many body files there are and their bytes.
func (bf *bodyFiles) stats() (files int, bytes int64) {
	bf.mu.Lock()
	defer bf.mu.Unlock()
	for _, f := range bf.files {
		bytes += f.size
	}
	return len(bf.files), bytes
}

// closeAll closes every file. With sync, the active file is synced first.
func (bf *bodyFiles) closeAll() error {
	bf.readMu.Lock()
	defer bf.readMu.Unlock()
	bf.mu.Lock()
	defer bf.mu.Unlock()
	var errs []error
	for num, f := range bf.files {
		if bf.durable && f.dirty {
			errs = append(errs, unix.Fdatasync(int(f.f.Fd())))
		}
		errs = append(errs, f.f.Close())
		delete(bf.files, num)
	}
	bf.active, bf.dirty = nil, nil
	return errors.Join(errs...)
}

// pwriteAll writes the buffers one after the other at off, with as few
// system calls as the kernel allows.
func pwriteAll(f *os.File, bufs [][]byte, off int64) error {
	fd := int(f.Fd())
	for len(bufs) > 0 {
		n, err := unix.Pwritev(fd, bufs, off)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		off += int64(n)
		for len(bufs) > 0 && n >= len(bufs[0]) {
			n -= len(bufs[0])
			bufs = bufs[1:]
		}
		if len(bufs) > 0 {
			bufs[0] = bufs[0][n:]
		}
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// bodyFileError wraps err; a full file system becomes mta.ErrStorageFull.
func bodyFileError(doing string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return mta.ErrStorageFull
	}
	return fmt.Errorf("spool: %s a body file: %w", doing, err)
}

// groupSync runs one sync at a time for many callers. A caller waits for a
// sync that began after it called, so that the sync covers what it wrote
// before; callers that come while a sync runs share the next one.
type groupSync struct {
	mu       sync.Mutex
	cond     *sync.Cond
	started  uint64 // syncs begun
	finished uint64 // syncs ended
	running  bool
	err      error // the first failure; every later call returns it
}

func (g *groupSync) wait(syncFn func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	want := g.started + 1
	for g.finished < want && g.err == nil {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		g.mu.Unlock()
		err := syncFn()
		g.mu.Lock()
		g.running = false
		g.finished = g.started
		if err != nil && g.err == nil {
			g.err = err
		}
		g.cond.Broadcast()
	}
	return g.err
}

// writeBodyFiles writes the bytes of each message of at least
// Options.BodyFileThreshold to a body file, sets where in its record, and,
// with Options.Sync, syncs them before it returns, so that the records can
// be committed. On an error no message keeps a location.
func (s *Spool) writeBodyFiles(msgs []Incoming) error {
	limit := s.opts.BodyFileThreshold
	if limit <= 0 {
		return nil
	}
	wrote := false
	for _, in := range msgs {
		if int64(len(in.Header)+len(in.Body)) < limit {
			continue
		}
		loc, err := s.bodies.append(in.Header, in.Body)
		if err != nil {
			s.releaseBodies(msgs)
			s.metrics.errors.WithLabelValues("put_body").Inc()
			return err
		}
		in.Message.body = loc
		wrote = true
	}
	if wrote && s.opts.Sync {
		if err := s.bodies.syncAll(); err != nil {
			s.releaseBodies(msgs)
			s.breakOn(err)
			return err
		}
	}
	return nil
}

// releaseBodies gives back the body-file locations of messages whose
// records were not committed.
func (s *Spool) releaseBodies(msgs []Incoming) {
	for _, in := range msgs {
		s.bodies.release(in.Message.body, int64(len(in.Header)+len(in.Body)))
		in.Message.body = bodyLocation{}
	}
}

// breakOn makes the spool refuse every later write after a body file
// could not be written (a full file system aside) or synced (whatever the
// reason): what the kernel could not write may be gone from its cache too,
// so nothing written since can be trusted to be on disk.
func (s *Spool) breakOn(err error) {
	if errors.Is(err, mta.ErrStorageFull) {
		return
	}
	e := fmt.Errorf("spool: broken by a failed body file sync: %w", err)
	if s.broken.CompareAndSwap(nil, &e) {
		s.log.Error("spool broken: refusing all writes until restart", zap.Error(err))
	}
}

// moveBodyIntoPebble adds to b the bytes of message m, read from its body
// file, under b/<id>, and clears m's location. update uses it for messages
// that will stay queued for a while (deferred or held), so that they do
// not keep a whole body file. It returns the location to release once b
// is committed.
func (s *Spool) moveBodyIntoPebble(m *Message, b *pebble.Batch) (bodyLocation, error) {
	loc := m.body
	if loc.File == 0 {
		return loc, nil
	}
	data, err := s.bodies.read(nil, loc, m.Size)
	if err != nil {
		return bodyLocation{}, err
	}
	var k keyBuf
	_ = b.Set(k.body(m.ID), data, nil)
	m.body = bodyLocation{}
	return loc, nil
}

// reapBodyFiles removes the body files no record points to any more, and
// empties old sparse ones. Before it removes any it makes a synced commit,
// so that the commits that released them (removals and moves, some of them
// not synced) are on disk first: a crash can then never bring back a
// record whose file is gone.
func (s *Spool) reapBodyFiles() {
	defer close(s.reaperDone)
	tick := time.NewTicker(s.bodies.sparseCheck)
	defer tick.Stop()
	for {
		select {
		case <-s.reaperStop:
			return
		case <-tick.C:
			s.emptySparseBodyFiles()
		case <-s.bodies.wake:
		}
		nums := s.bodies.removable()
		if len(nums) == 0 {
			continue
		}
		// Also without Options.Sync: a record that a lost commit brings
		// back must not find its file gone, whatever else it loses.
		b := s.db.NewBatch()
		_ = b.LogData(nil, nil)
		err := s.commitWith(b, "sync", pebble.Sync)
		b.Close()
		if err != nil {
			continue // the next tick tries again
		}
		if err := s.bodies.remove(nums); err != nil {
			s.log.Warn("spool: removing body files", zap.Error(err))
		}
	}
}

// maxMovesPerCheck bounds the bodies one check moves out of sparse files;
// the next check goes on.
const maxMovesPerCheck = 10_000

// emptySparseBodyFiles moves the live bodies of old sparse files into
// Pebble. The files have no index of their messages, so it reads the
// records; it runs only while such files exist.
func (s *Spool) emptySparseBodyFiles() {
	files := s.bodies.sparse(time.Now())
	if len(files) == 0 {
		return
	}
	var ids []string
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixMessage), UpperBound: []byte(prefixEnd(prefixMessage))})
	if err == nil {
		for ok := it.First(); ok && len(ids) < maxMovesPerCheck; ok = it.Next() {
			if s.stopping() {
				break
			}
			id := string(it.Key()[len(prefixMessage):])
			if m, err := decodeMessage(id, it.Value()); err == nil && files[m.body.File] {
				ids = append(ids, id)
			}
		}
		err = errors.Join(it.Error(), it.Close())
	}
	s.closeMu.RUnlock()
	if err != nil {
		s.log.Warn("spool: looking for the messages of sparse body files", zap.Error(err))
		return
	}
	for _, id := range ids {
		if s.stopping() {
			return
		}
		err := s.update("move", id, func(*Message, *pebble.Batch) (*Transition, error) { return nil, nil })
		if err != nil && !errors.Is(err, mta.ErrNotFound) {
			s.log.Warn("spool: moving a body out of a sparse body file", zap.String("id", id), zap.Error(err))
			return
		}
	}
	s.log.Info("spool: emptied sparse body files", zap.Int("files", len(files)), zap.Int("messages", len(ids)))
}

// stopping reports whether Close has begun.
func (s *Spool) stopping() bool {
	select {
	case <-s.reaperStop:
		return true
	default:
		return false
	}
}
