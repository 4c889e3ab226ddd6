// Command goracle is the conformance oracle for peerstar's eStargz code: it drives the
// reference Go implementation (containerd/stargz-snapshotter estargz v0.12.0, Debian's
// copy) so the Python test suite can compare peerstar against it in both directions.
//
// It is test-only code, built in GOPATH mode against /usr/share/gocode by
// tests/support/goracle.py. Every sub-command prints JSON (or raw bytes for `toc` and
// `cat`) on stdout; errors go to stderr with exit status 1.
//
//	build [--chunk-size N] [--level L] [--zstd] [--prioritize P]... [--allow-missing] IN OUT
//	toc BLOB                      raw uncompressed TOC JSON bytes
//	tocinfo BLOB                  {"compression","tocOffset","tocSize","tocDigest","blobSize"}
//	ls BLOB [--toc-digest D]      the Go reader's view of every path
//	cat BLOB PATH                 file contents via Reader.OpenFile
//	verify BLOB --toc-digest D    VerifyTOC + every chunk checked with its Verifier
//	diffid BLOB                   {"diffID","uncompressedSize"} of the decompressed blob
//	decompress BLOB               the whole decompressed blob (raw bytes)
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	// The Go writer splits its work into GOMAXPROCS parts and the blob depends on the
	// split; default to one part so results are reproducible unless the caller asks.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	if len(os.Args) < 2 {
		fail(errors.New("usage: goracle build|toc|tocinfo|ls|cat|verify|diffid|decompress ..."))
	}
	var err error
	args := os.Args[2:]
	switch os.Args[1] {
	case "build":
		err = cmdBuild(args)
	case "toc":
		err = cmdTOC(args)
	case "tocinfo":
		err = cmdTOCInfo(args)
	case "ls":
		err = cmdLs(args)
	case "cat":
		err = cmdCat(args)
	case "verify":
		err = cmdVerify(args)
	case "diffid":
		err = cmdDiffID(args)
	case "decompress":
		err = cmdDecompress(args)
	default:
		err = fmt.Errorf("unknown sub-command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "goracle: %v\n", err)
	os.Exit(1)
}

// parsedArgs holds flags (which may appear anywhere, unlike the flag package allows)
// and positional arguments.
type parsedArgs struct {
	values     map[string][]string
	bools      map[string]bool
	positional []string
}

func parseArgs(args []string, valueFlags, boolFlags []string) (*parsedArgs, error) {
	isValue := map[string]bool{}
	for _, f := range valueFlags {
		isValue[f] = true
	}
	isBool := map[string]bool{}
	for _, f := range boolFlags {
		isBool[f] = true
	}
	p := &parsedArgs{values: map[string][]string{}, bools: map[string]bool{}}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			p.positional = append(p.positional, a)
			continue
		}
		name, val, hasVal := strings.Cut(a[2:], "=")
		switch {
		case isBool[name]:
			p.bools[name] = true
		case isValue[name]:
			if !hasVal {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("flag --%s needs a value", name)
				}
				i++
				val = args[i]
			}
			p.values[name] = append(p.values[name], val)
		default:
			return nil, fmt.Errorf("unknown flag --%s", name)
		}
	}
	return p, nil
}

func (p *parsedArgs) last(name string) (string, bool) {
	v := p.values[name]
	if len(v) == 0 {
		return "", false
	}
	return v[len(v)-1], true
}

func writeJSON(v interface{}) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	return enc.Encode(v)
}

// zstdCompression glues zstdchunked's Compressor and Decompressor into the
// estargz.Compression that estargz.Build wants.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

type buildOutput struct {
	TOCDigest        string            `json:"tocDigest"`
	DiffID           string            `json:"diffID"`
	BlobDigest       string            `json:"blobDigest"`
	BlobSize         int64             `json:"blobSize"`
	UncompressedSize int64             `json:"uncompressedSize"`
	Missed           []string          `json:"missed"`
	Annotations      map[string]string `json:"annotations"`
}

func cmdBuild(args []string) error {
	p, err := parseArgs(args, []string{"chunk-size", "level", "prioritize"},
		[]string{"zstd", "allow-missing"})
	if err != nil {
		return err
	}
	if len(p.positional) != 2 {
		return errors.New("build: want IN.tar OUT.blob")
	}
	in, err := os.Open(p.positional[0])
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	var opts []estargz.Option
	if v, ok := p.last("chunk-size"); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("--chunk-size: %w", err)
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	level := -1
	if v, ok := p.last("level"); ok {
		if level, err = strconv.Atoi(v); err != nil {
			return fmt.Errorf("--level: %w", err)
		}
	}
	metadata := map[string]string{}
	var dec estargz.Decompressor = new(estargz.GzipDecompressor)
	if p.bools["zstd"] {
		zlevel := zstd.SpeedDefault
		if level >= 0 {
			zlevel = zstd.EncoderLevelFromZstd(level)
		}
		zc := &zstdCompression{
			&zstdchunked.Compressor{CompressionLevel: zlevel, Metadata: metadata},
			&zstdchunked.Decompressor{},
		}
		opts = append(opts, estargz.WithCompression(zc))
		dec = zc.Decompressor
	} else if level >= 0 {
		opts = append(opts, estargz.WithCompressionLevel(level))
	}
	if prio := p.values["prioritize"]; len(prio) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prio))
	}
	missed := []string{}
	if p.bools["allow-missing"] {
		opts = append(opts, estargz.WithAllowPrioritizeNotFound(&missed))
	}

	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	out, err := os.Create(p.positional[1])
	if err != nil {
		blob.Close()
		return err
	}
	blobHash := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, blobHash), blob)
	if err != nil {
		blob.Close()
		out.Close()
		return err
	}
	if err := blob.Close(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}

	// The uncompressed size is what ctr-remote/nerdctl record: the length of the whole
	// decompressed blob. Decompress our own output to count it and to cross-check the
	// DiffID Build reported.
	f, err := os.Open(p.positional[1])
	if err != nil {
		return err
	}
	defer f.Close()
	dr, err := dec.Reader(bufio.NewReader(f))
	if err != nil {
		return err
	}
	diffHash := sha256.New()
	usize, err := io.Copy(diffHash, dr)
	dr.Close()
	if err != nil {
		return fmt.Errorf("decompressing the built blob: %w", err)
	}
	diffID := blob.DiffID().String()
	if got := "sha256:" + hex.EncodeToString(diffHash.Sum(nil)); got != diffID {
		return fmt.Errorf("internal: Build's DiffID %s != digest of decompressed blob %s",
			diffID, got)
	}
	annotations := map[string]string{
		estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
		estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
	}
	for k, v := range metadata {
		annotations[k] = v
	}
	return writeJSON(buildOutput{
		TOCDigest:        blob.TOCDigest().String(),
		DiffID:           diffID,
		BlobDigest:       "sha256:" + hex.EncodeToString(blobHash.Sum(nil)),
		BlobSize:         n,
		UncompressedSize: usize,
		Missed:           missed,
		Annotations:      annotations,
	})
}

// blobFile is an opened blob plus the decompressor its footer selects.
type blobFile struct {
	f           *os.File
	sr          *io.SectionReader
	compression string
	dec         tocDecompressor
	tocOffset   int64
	tocSize     int64
}

// tocDecompressor is estargz.Decompressor plus DecompressTOC, which all three concrete
// decompressors have but the interface in v0.12.0 lacks.
type tocDecompressor interface {
	estargz.Decompressor
	DecompressTOC(r io.Reader) (io.ReadCloser, error)
}

// openBlob finds the footer the way estargz.Open does: try eStargz, legacy stargz,
// then zstd:chunked, each on the tail of the blob.
func openBlob(path string) (*blobFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	cands := []struct {
		name string
		dec  tocDecompressor
	}{
		{"gzip", new(estargz.GzipDecompressor)},
		{"gzip-legacy", new(estargz.LegacyGzipDecompressor)},
		{"zstd", new(zstdchunked.Decompressor)},
	}
	var errs []string
	for _, c := range cands {
		fsize := c.dec.FooterSize()
		if fsize > sr.Size() {
			errs = append(errs, fmt.Sprintf("%s: blob smaller than footer", c.name))
			continue
		}
		footer := make([]byte, fsize)
		if _, err := sr.ReadAt(footer, sr.Size()-fsize); err != nil {
			f.Close()
			return nil, err
		}
		_, tocOff, tocSize, err := c.dec.ParseFooter(footer)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.name, err))
			continue
		}
		if tocSize <= 0 {
			tocSize = sr.Size() - tocOff - fsize
		}
		if tocOff < 0 || tocSize < 0 || tocOff+tocSize > sr.Size() {
			errs = append(errs, fmt.Sprintf("%s: TOC range out of blob", c.name))
			continue
		}
		// Accept this format only if its TOC actually decompresses, as Open does.
		if _, err := readTOC(c.dec, sr, tocOff, tocSize); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", c.name, err))
			continue
		}
		return &blobFile{f: f, sr: sr, compression: c.name, dec: c.dec,
			tocOffset: tocOff, tocSize: tocSize}, nil
	}
	f.Close()
	return nil, fmt.Errorf("no footer recognised: %s", strings.Join(errs, "; "))
}

func readTOC(dec tocDecompressor, sr *io.SectionReader, off, size int64) ([]byte, error) {
	rc, err := dec.DecompressTOC(io.NewSectionReader(sr, off, size))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func cmdTOC(args []string) error {
	if len(args) != 1 {
		return errors.New("toc: want BLOB")
	}
	b, err := openBlob(args[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	raw, err := readTOC(b.dec, b.sr, b.tocOffset, b.tocSize)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(raw)
	return err
}

func cmdTOCInfo(args []string) error {
	if len(args) != 1 {
		return errors.New("tocinfo: want BLOB")
	}
	b, err := openBlob(args[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	raw, err := readTOC(b.dec, b.sr, b.tocOffset, b.tocSize)
	if err != nil {
		return err
	}
	return writeJSON(map[string]interface{}{
		"compression": b.compression,
		"tocOffset":   b.tocOffset,
		"tocSize":     b.tocSize,
		"tocDigest":   digest.FromBytes(raw).String(),
		"blobSize":    b.sr.Size(),
	})
}

// openReader opens the blob with estargz.Open, zstd:chunked included.
func openReader(path string) (*blobFile, *estargz.Reader, error) {
	b, err := openBlob(path)
	if err != nil {
		return nil, nil, err
	}
	r, err := estargz.Open(b.sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		b.f.Close()
		return nil, nil, fmt.Errorf("estargz.Open: %w", err)
	}
	return b, r, nil
}

type chunkOut struct {
	Offset      int64  `json:"offset"`
	NextOffset  int64  `json:"nextOffset"`
	ChunkOffset int64  `json:"chunkOffset"`
	ChunkSize   int64  `json:"chunkSize"`
	ChunkDigest string `json:"chunkDigest"`
}

type entryOut struct {
	Path          string            `json:"path"` // where the walk found it
	Name          string            `json:"name"` // the entry's own name (hardlinks: target)
	Type          string            `json:"type"`
	Mode          uint32            `json:"mode"` // Stat().Mode(), Go os.FileMode bits
	ModeString    string            `json:"modeString"`
	RawMode       int64             `json:"rawMode"` // TOCEntry.Mode, the tar mode
	UID           int               `json:"uid"`
	GID           int               `json:"gid"`
	Uname         string            `json:"uname"`
	Gname         string            `json:"gname"`
	Size          int64             `json:"size"`
	LinkName      string            `json:"linkName"`
	DevMajor      int               `json:"devMajor"`
	DevMinor      int               `json:"devMinor"`
	Xattrs        map[string][]byte `json:"xattrs"` // values base64 (encoding/json)
	NumLink       int               `json:"numLink"`
	ModTime       string            `json:"modtime"` // as in the TOC
	ModTimeUnix   int64             `json:"modtimeUnix"`
	Digest        string            `json:"digest"`
	Chunks        []chunkOut        `json:"chunks"`
	ContentDigest string            `json:"contentDigest,omitempty"` // sha256 via OpenFile
}

type lsOutput struct {
	Compression string     `json:"compression"`
	TOCDigest   string     `json:"tocDigest"`
	Entries     []entryOut `json:"entries"`
}

// walk visits every path reachable from the root, sorted, root ("") first.
func walk(r *estargz.Reader) ([]string, map[string]*estargz.TOCEntry, error) {
	root, ok := r.Lookup("")
	if !ok {
		return nil, nil, errors.New("no root entry")
	}
	found := map[string]*estargz.TOCEntry{"": root}
	var rec func(dir string, e *estargz.TOCEntry)
	rec = func(dir string, e *estargz.TOCEntry) {
		e.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
			p := base
			if dir != "" {
				p = dir + "/" + base
			}
			found[p] = c
			if c.Type == "dir" {
				rec(p, c)
			}
			return true
		})
	}
	rec("", root)
	paths := make([]string, 0, len(found))
	for p := range found {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	return paths, found, nil
}

// chunksOf walks the file with ChunkEntryForOffset. It uses the entry's own name, not
// the walked path: for a hardlink path v0.12.0 looks up chunks under the link's name
// and would report only the first chunk.
func chunksOf(r *estargz.Reader, e *estargz.TOCEntry) ([]*estargz.TOCEntry, error) {
	var out []*estargz.TOCEntry
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(e.Name, off)
		if !ok {
			return nil, fmt.Errorf("%q: no chunk for offset %d", e.Name, off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return nil, fmt.Errorf("%q: chunk for offset %d starts at %d size %d",
				e.Name, off, ce.ChunkOffset, ce.ChunkSize)
		}
		out = append(out, ce)
		off += ce.ChunkSize
	}
	return out, nil
}

func cmdLs(args []string) error {
	p, err := parseArgs(args, []string{"toc-digest"}, []string{"no-content"})
	if err != nil {
		return err
	}
	if len(p.positional) != 1 {
		return errors.New("ls: want BLOB")
	}
	b, r, err := openReader(p.positional[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	if d, ok := p.last("toc-digest"); ok {
		if _, err := r.VerifyTOC(digest.Digest(d)); err != nil {
			return fmt.Errorf("VerifyTOC: %w", err)
		}
	}
	paths, found, err := walk(r)
	if err != nil {
		return err
	}
	out := lsOutput{Compression: b.compression, TOCDigest: r.TOCDigest().String(),
		Entries: []entryOut{}}
	for _, path := range paths {
		e := found[path]
		fi := e.Stat()
		eo := entryOut{
			Path: path, Name: e.Name, Type: e.Type,
			Mode: uint32(fi.Mode()), ModeString: fi.Mode().String(), RawMode: e.Mode,
			UID: e.UID, GID: e.GID, Uname: e.Uname, Gname: e.Gname,
			Size: e.Size, LinkName: e.LinkName, DevMajor: e.DevMajor, DevMinor: e.DevMinor,
			Xattrs: e.Xattrs, NumLink: e.NumLink,
			ModTime: e.ModTime3339, ModTimeUnix: e.ModTime().Unix(),
			Digest: e.Digest, Chunks: []chunkOut{},
		}
		if eo.Xattrs == nil {
			eo.Xattrs = map[string][]byte{}
		}
		if e.ModTime().IsZero() {
			eo.ModTimeUnix = 0
		}
		if e.Type == "reg" {
			chunks, err := chunksOf(r, e)
			if err != nil {
				return err
			}
			for _, c := range chunks {
				eo.Chunks = append(eo.Chunks, chunkOut{c.Offset, c.NextOffset(),
					c.ChunkOffset, c.ChunkSize, c.ChunkDigest})
			}
			if !p.bools["no-content"] {
				sr, err := r.OpenFile(path)
				if err != nil {
					return fmt.Errorf("OpenFile(%q): %w", path, err)
				}
				h := sha256.New()
				// 1 MiB reads: they start mid-chunk and span chunks, and avoid the
				// re-decompression per 32 KiB read that makes io.Copy quadratic here.
				n, err := io.CopyBuffer(h, sr, make([]byte, 1<<20))
				if err != nil || n != e.Size {
					return fmt.Errorf("reading %q: %d of %d bytes: %v", path, n, e.Size, err)
				}
				eo.ContentDigest = "sha256:" + hex.EncodeToString(h.Sum(nil))
			}
		}
		out.Entries = append(out.Entries, eo)
	}
	return writeJSON(out)
}

func cmdCat(args []string) error {
	if len(args) != 2 {
		return errors.New("cat: want BLOB PATH")
	}
	b, r, err := openReader(args[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	sr, err := r.OpenFile(args[1])
	if err != nil {
		return err
	}
	_, err = io.Copy(os.Stdout, sr)
	return err
}

func cmdVerify(args []string) error {
	p, err := parseArgs(args, []string{"toc-digest"}, nil)
	if err != nil {
		return err
	}
	d, ok := p.last("toc-digest")
	if len(p.positional) != 1 || !ok {
		return errors.New("verify: want BLOB --toc-digest D")
	}
	b, r, err := openReader(p.positional[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	v, err := r.VerifyTOC(digest.Digest(d))
	if err != nil {
		return fmt.Errorf("VerifyTOC: %w", err)
	}
	paths, found, err := walk(r)
	if err != nil {
		return err
	}
	seen := map[*estargz.TOCEntry]bool{}
	var nchunks, nfiles int
	var nbytes int64
	for _, path := range paths {
		e := found[path]
		if e.Type != "reg" || seen[e] {
			continue
		}
		seen[e] = true
		nfiles++
		chunks, err := chunksOf(r, e)
		if err != nil {
			return err
		}
		whole := sha256.New()
		for _, ce := range chunks {
			// The compressed section of a chunk starts at its own stream (gzip member or
			// zstd frame) and ends where the next data entry's stream starts.
			sec := io.NewSectionReader(b.sr, ce.Offset, ce.NextOffset()-ce.Offset)
			dr, err := b.dec.Reader(sec)
			if err != nil {
				return fmt.Errorf("%q chunk at %d: %w", e.Name, ce.ChunkOffset, err)
			}
			buf := make([]byte, ce.ChunkSize)
			_, err = io.ReadFull(dr, buf)
			dr.Close()
			if err != nil {
				return fmt.Errorf("%q chunk at %d: decompress: %w", e.Name, ce.ChunkOffset, err)
			}
			cv, err := v.Verifier(ce)
			if err != nil {
				return fmt.Errorf("%q chunk at %d: %w", e.Name, ce.ChunkOffset, err)
			}
			if _, err := cv.Write(buf); err != nil {
				return err
			}
			if !cv.Verified() {
				return fmt.Errorf("%q chunk at %d (offset %d): digest mismatch", e.Name,
					ce.ChunkOffset, ce.Offset)
			}
			whole.Write(buf)
			nchunks++
			nbytes += ce.ChunkSize
		}
		if e.Digest != "" {
			if got := "sha256:" + hex.EncodeToString(whole.Sum(nil)); got != e.Digest {
				return fmt.Errorf("%q: file digest %s, TOC says %s", e.Name, got, e.Digest)
			}
		}
	}
	// The blob must also decompress as one stream, start to end.
	if err := checkStreams(b); err != nil {
		return err
	}
	return writeJSON(map[string]interface{}{
		"ok": true, "files": nfiles, "chunks": nchunks, "bytes": nbytes,
		"compression": b.compression, "tocDigest": r.TOCDigest().String(),
	})
}

// checkStreams decompresses the whole blob as one stream (multi-member gzip, or zstd
// frames with the skippable TOC and footer frames skipped), as a plain `tar xzf` or a
// non-lazy puller would, and requires whole 512-byte tar blocks.
func checkStreams(b *blobFile) error {
	dr, err := b.dec.Reader(io.NewSectionReader(b.sr, 0, b.sr.Size()))
	if err != nil {
		return fmt.Errorf("whole-blob decompress: %w", err)
	}
	defer dr.Close()
	n, err := io.Copy(io.Discard, dr)
	if err != nil {
		return fmt.Errorf("whole-blob decompress: %w", err)
	}
	if n%512 != 0 {
		return fmt.Errorf("decompressed blob is %d bytes, not a multiple of 512", n)
	}
	return nil
}

// cmdDecompress writes the whole decompressed blob to stdout.
func cmdDecompress(args []string) error {
	if len(args) != 1 {
		return errors.New("decompress: want BLOB")
	}
	b, err := openBlob(args[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	dr, err := b.dec.Reader(bufio.NewReader(io.NewSectionReader(b.sr, 0, b.sr.Size())))
	if err != nil {
		return err
	}
	defer dr.Close()
	w := bufio.NewWriter(os.Stdout)
	if _, err := io.Copy(w, dr); err != nil {
		return err
	}
	return w.Flush()
}

// cmdDiffID decompresses the whole blob with the Go decompressor its footer selects
// (what a non-lazy puller does) and reports the digest and length.
func cmdDiffID(args []string) error {
	if len(args) != 1 {
		return errors.New("diffid: want BLOB")
	}
	b, err := openBlob(args[0])
	if err != nil {
		return err
	}
	defer b.f.Close()
	dr, err := b.dec.Reader(bufio.NewReader(io.NewSectionReader(b.sr, 0, b.sr.Size())))
	if err != nil {
		return err
	}
	defer dr.Close()
	h := sha256.New()
	n, err := io.Copy(h, dr)
	if err != nil {
		return err
	}
	return writeJSON(map[string]interface{}{
		"diffID":           "sha256:" + hex.EncodeToString(h.Sum(nil)),
		"uncompressedSize": n,
	})
}
