package bench

import (
	"fmt"

	"go.yaml.in/yaml/v3"
)

// mergeSections returns the YAML document text with the keys a mapping
// holds more than once merged, the later winning: a scenario's own
// "delivery:" block and one given with --mta-config become one, key by
// key, instead of a configuration the mta refuses for its duplicate key.
func mergeSections(text string) (string, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(text), &doc); err != nil {
		return "", fmt.Errorf("mta configuration: %w", err)
	}
	if len(doc.Content) == 0 {
		return text, nil
	}
	mergeMapping(doc.Content[0])
	out, err := yaml.Marshal(&doc)
	if err != nil {
		return "", fmt.Errorf("mta configuration: %w", err)
	}
	return string(out), nil
}

// mergeMapping merges, in place and at every depth, the repeated keys of
// mapping n: two mappings merge, an empty value adds nothing, anything else
// is replaced by the later. (Anchors and aliases are not expected in
// these configurations and are not followed.)
func mergeMapping(n *yaml.Node) {
	if n.Kind != yaml.MappingNode {
		return
	}
	at := map[string]int{} // key → index of its value in kept
	var kept []*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		key, val := n.Content[i], n.Content[i+1]
		j, seen := at[key.Value]
		switch {
		case !seen:
			at[key.Value] = len(kept) + 1
			kept = append(kept, key, val)
		case val.Tag == "!!null":
			// An empty section ("delivery:") adds nothing, as the mta
			// reads it: it does not wipe the earlier one.
		case kept[j].Kind == yaml.MappingNode && val.Kind == yaml.MappingNode:
			kept[j].Content = append(kept[j].Content, val.Content...)
			kept[j].Style = 0 // block style: the merged mapping may be long
		default:
			kept[j] = val
		}
	}
	n.Content = kept
	for i := 1; i < len(n.Content); i += 2 {
		mergeMapping(n.Content[i])
	}
}
